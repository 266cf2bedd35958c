"""The issue-18 yardstick: a tuned SmolLM2's exact match beside a fine-tuned MiniLM classifier on the same rows.

The instruction set (``bench/make_instruct.py``: one user turn holding a fixed prompt and the
review, one assistant turn holding the label) is written back as the equivalent classification
CSV, the SAME rows (``text`` = the review after ``Review: ``, ``label`` = the answer), train and
test (and dev for checkpoint choice, as the SFT run uses it). ``minilm`` is fine-tuned on it with
slimtune's defaults (``slimtune finetune --model minilm --train train.csv --eval dev.csv``: method
full, its default lr / epochs / step floor, batch 32, ``max_length: auto``), then
``slimtune evaluate`` gives its test accuracy. The SmolLM2 figure is read from a
``slimtune evaluate --model SFT_DIR --eval test.jsonl`` metrics JSON (``exact_match``). Target:
SmolLM2 exact match >= 85% of MiniLM's test accuracy.

    nice python bench/sft_vs_classifier.py --data /work/assets/rt_instruct \\
        --sft-metrics SFT_TEST_METRICS.json --out bench/results/sft_vs_minilm.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MARK = "\n\nReview: "
CLI = [sys.executable, "-c", "import sys; from slimtune.cli.main import main; sys.exit(main())"]


def to_csv(src: Path, dest: Path) -> dict[str, Any]:
    """Write the chat rows of ``src`` as ``text,label`` CSV (same rows, same order); their label counts."""
    rows = []
    for i, line in enumerate(src.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        msgs = json.loads(line)["messages"]
        user, answer = msgs[-2]["content"], msgs[-1]["content"]
        if msgs[-2]["role"] != "user" or MARK not in user:
            raise SystemExit(f"{src}:{i}: not a make_instruct.py row (no {MARK.strip()!r} in the user turn)")
        rows.append((user.split(MARK, 1)[1], answer))
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    counts: dict[str, int] = {}
    for _, y in rows:
        counts[y] = counts.get(y, 0) + 1
    return {"path": str(dest), "rows": len(rows), "labels": dict(sorted(counts.items()))}


def slimtune(args: list[str], log: Path) -> float:
    """Run a slimtune command (output to ``log``); its wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([*CLI, *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}).returncode
    if rc != 0:
        raise SystemExit(f"slimtune {args[0]}: exit {rc}; see {log}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Convert, fine-tune MiniLM, evaluate, put the SmolLM2 figure beside it."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/work/assets/rt_instruct", help="folder with train/dev/test.jsonl")
    ap.add_argument("--sft-metrics", help="metrics JSON of the tuned SmolLM2 on test.jsonl (slimtune evaluate)")
    ap.add_argument("--work", help="folder for the CSVs and the MiniLM run (default: a temp folder)")
    ap.add_argument("--out", help="write the results JSON here")
    a = ap.parse_args(argv)
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="sft-vs-clf-")
    work = Path(a.work or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    splits = {s: to_csv(data / f"{s}.jsonl", work / f"{s}.csv") for s in ("train", "dev", "test")}
    out = work / "minilm"
    train_cmd = ["finetune", "--model", "minilm", "--train", str(work / "train.csv"), "--eval", str(work / "dev.csv"),
                 "--output", str(out), "--overwrite", "--no-tensorboard", "--no-progress"]
    seconds = slimtune(train_cmd, work / "finetune.log")
    eval_cmd = ["evaluate", "--model", str(out), "--eval", str(work / "test.csv"), "--output", str(work / "test_metrics.json")]
    slimtune(eval_cmd, work / "evaluate.log")
    test = json.loads((work / "test_metrics.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())
    result: dict[str, Any] = {
        "what": "MiniLM-L6 classifier fine-tuned with slimtune defaults on the instruction set's rows, as CSV",
        "splits": splits, "minilm": {
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "per_class": test["per_class"],
            "dev_accuracy": trained.get("accuracy"), "train_seconds": trained["train"]["train_seconds"],
            "steps": trained["train"]["steps"], "wall_s": seconds,
            "defaults": {k: v["value"] for k, v in _provenance(out).items()},
            "commands": ["slimtune " + " ".join(train_cmd), "slimtune " + " ".join(eval_cmd)]}}
    if a.sft_metrics:
        sft = json.loads(Path(a.sft_metrics).read_text())
        result["smollm2"] = {k: sft.get(k) for k in ("exact_match", "accuracy", "macro_f1", "no_label",
                                                      "answer_perplexity", "n", "eval_file")}
        result["smollm2"]["metrics_file"] = a.sft_metrics
        result["exact_match_over_minilm_accuracy"] = sft["exact_match"] / test["accuracy"]
        result["target"] = ">= 0.85"
    print(json.dumps({k: v for k, v in result.items() if k != "splits"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _provenance(out: Path) -> dict[str, Any]:
    """The defaulted values of the run and their sources (recipe.yaml's provenance)."""
    return (yaml.safe_load((out / "recipe.yaml").read_text()) or {}).get("provenance", {})


if __name__ == "__main__":
    sys.exit(main())
