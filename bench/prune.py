"""Pruning benchmark: params, size on disk, CPU latency and accuracy of pruned models vs the unpruned one.

Each variant is produced by ``slimtune.compress.prune.recipe.run_prune`` (recovery fine-tuning on SST-2 train rows
with KD from the unpruned model), then every output folder is reloaded with plain transformers
and timed side by side with the unpruned model in ONE interleaved run
(``slimtune.benchmark.latency.measure_latency``, bs 1, seq 128, 1 thread). Accuracy is on the test file.

Run under the shared CPU lock (it trains and times real models):

    flock /tmp/slimtune-heavy.lock python bench/prune.py --model /work/artifacts/minilm-sst2 \\
        --out /work/artifacts/pruner/bench

Prints a Markdown table and writes ``OUT/bench_prune.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SLIMTUNE_NO_PROGRESS", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"

# name -> (label, prune settings). Training rows/steps come from the command line. "from" prunes
# another variant's output instead of the unpruned model: vocabulary pruning is exact on the
# training text, so pruning the vocabulary of the recovered structured model is the same as
# pruning it first and recovering after (the recovery batches tokenize identically).
VARIANTS: dict[str, tuple[str, dict]] = {
    "unstructured50": ("50% unstructured (gradual, KD)", {"sparsity": 0.5, "kd": True}),
    "structured": ("FFN 67% + 2 of 6 layers (KD)", {"ffn": 0.667, "layers": 2, "kd": True}),
    "vocab": ("vocabulary from train.tsv (no training)", {"vocab": True, "recover": False}),
    "combined": ("structured + vocabulary", {"vocab": True, "recover": False, "from": "structured"}),
}


def build(args: argparse.Namespace, name: str, kw: dict) -> Path:
    from slimtune.compress.prune.recipe import PruneSettings, run_prune

    out = Path(args.out) / name
    if args.reuse and (out / "metrics.json").is_file():
        return out
    kw = dict(kw)
    recover = kw.pop("recover", True)
    source = str(Path(args.out) / kw.pop("from")) if "from" in kw else args.model
    if kw.pop("vocab", False):
        kw["vocab_from"] = [args.train]
    structured = "ffn" in kw or "layers" in kw  # the structured variants may get a longer recovery
    steps = (args.structured_recover_steps or args.recover_steps) if structured else args.recover_steps
    rows = (args.structured_max_train_samples or args.max_train_samples) if structured else args.max_train_samples
    s = PruneSettings(model=source, output=str(out), train=args.train, eval=args.test,
                      recover_steps=steps if recover else 0, max_train_samples=rows,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, **kw)
    t0 = time.perf_counter()
    run_prune(s)
    print(f"[bench] built {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def measure(args: argparse.Namespace, dirs: dict[str, Path]) -> dict[str, dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimtune.benchmark.timing import (
        hardware_fingerprint,
        measure_latency,
        sample_inputs,
        set_threads,
        torch_runner,
    )
    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.evaluate.evaluator import evaluate_classifier
    from slimtune.io import weights_size_mb
    from slimtune.models.loading import count_params, label_names_of

    set_threads(1)
    rows: dict[str, dict] = {}
    runners = {}
    for name, d in dirs.items():
        tok = AutoTokenizer.from_pretrained(d)  # plain transformers, as a user would load it
        model = AutoModelForSequenceClassification.from_pretrained(d).eval()
        names = label_names_of(model)
        test = load_classification(args.test, label_names=names)
        set_threads(2)  # accuracy with both cores (latency below uses one)
        acc = evaluate_classifier(model, tokenize_classification(test, tok, 128), names)["accuracy"]
        set_threads(1)
        side = d / "sparse" / "model.safetensors"
        rows[name] = {"dir": str(d), "params": count_params(model), "size_mb": weights_size_mb(d),
                      "sparse_sidecar_mb": side.stat().st_size / 1e6 if side.is_file() else None,
                      "accuracy": acc, "n_test": len(test)}
        runners[name] = torch_runner(model, sample_inputs(tok, 1, args.seq))
    lat = measure_latency(runners, repeats=args.repeats, warmup=5)
    for name in rows:
        rows[name].update(lat[name])
    rows["_hardware"] = hardware_fingerprint()
    return rows


def table(rows: dict[str, dict], labels: dict[str, str]) -> str:
    base = rows["unpruned"]
    out = ["| model | params | size MB (x smaller) | compact MB | p50 ms (x faster) | accuracy (pt vs unpruned) |",
           "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        side = f"{r['sparse_sidecar_mb']:.1f}" if r.get("sparse_sidecar_mb") else "-"
        out.append(f"| {labels.get(name, name)} | {r['params'] / 1e6:.2f}M | {r['size_mb']:.1f} "
                   f"({base['size_mb'] / r['size_mb']:.2f}x) | {side} | {r['p50_ms']:.1f} "
                   f"({base['p50_ms'] / r['p50_ms']:.2f}x) | {r['accuracy'] * 100:.2f} "
                   f"({(r['accuracy'] - base['accuracy']) * 100:+.2f}) |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/work/artifacts/minilm-sst2")
    p.add_argument("--train", default=str(DATA / "train.tsv"))
    p.add_argument("--test", default=str(DATA / "test.tsv"))
    p.add_argument("--out", default="/work/artifacts/pruner/bench")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--recover-steps", type=int, default=300)
    p.add_argument("--max-train-samples", type=int, default=20000)
    p.add_argument("--structured-recover-steps", type=int, help="recovery steps of the structured variants "
                   "(default: --recover-steps)")
    p.add_argument("--structured-max-train-samples", type=int, help="training rows of the structured variants "
                   "(default: --max-train-samples)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--seq", type=int, default=128, help="tokens per timed input (bs 1)")
    p.add_argument("--reuse", action="store_true", help="reuse variants already built in --out")
    p.add_argument("--measure-only", action="store_true", help="only measure variants already built")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    dirs = {"unpruned": Path(args.model)}
    for name in args.variants:
        d = Path(args.out) / name
        dirs[name] = d if args.measure_only else build(args, name, VARIANTS[name][1])
    rows = measure(args, dirs)
    labels = {"unpruned": "unpruned MiniLM-L6 (SST-2)", **{k: v[0] for k, v in VARIANTS.items()}}
    md = table(rows, labels)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prune.json").write_text(json.dumps({"rows": rows, "args": vars(args), "table": md}, indent=2))


if __name__ == "__main__":
    main()
