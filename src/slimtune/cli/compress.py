"""Accuracy-constrained search over student depth (distill), vocabulary and FFN pruning (prune) and int8 ONNX Runtime (quantize) under a time budget. Every candidate is kept; all are timed side by side at the end; OUT/best/ is the smallest/fastest that meets the constraints."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from slimtune.pipeline.search import CompressSettings, run_compress
from slimtune.report.html import enrich, markdown_table


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune compress``."""
    p.add_argument("--model", required=True, help="fine-tuned classifier folder (the teacher and reference)")
    p.add_argument("--train", required=True, help="training file (distillation, recovery, vocabulary)")
    p.add_argument("--eval", required=True, help="labelled file the constraint is checked on (use a dev split)")
    p.add_argument("--test", help="held-out labelled file: accuracy reported for every candidate, never used to choose")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--max-accuracy-drop", type=float, required=True, help="accuracy points the result may lose vs --model")
    p.add_argument("--max-size-mb", type=float, help="also require weights on disk <= S MB")
    p.add_argument("--max-latency-ms", type=float, help="also require p50 latency <= L ms (bench setting below)")
    p.add_argument("--budget-minutes", type=float, default=30.0, help="wall-clock budget of the search (default 30)")
    p.add_argument("--depths", type=_ints, default=[2, 3, 4], help="student layer counts to consider (default 2,3,4)")
    p.add_argument("--ffn", type=_floats, default=[0.5], help="FFN fractions to remove (default 0.5)")
    p.add_argument("--no-vocab", dest="vocab", action="store_false", help="do not prune the vocabulary to --train")
    p.add_argument("--quant", type=lambda t: [v for v in t.split(",") if v], default=["int8"],
                   help="quantized variants: int8 (ONNX Runtime) and/or none (default int8)")
    p.add_argument("--max-train-samples", type=int, default=8000, help="training rows per training step (default 8000)")
    p.add_argument("--max-eval-samples", type=int, help="evaluate on the first N rows of --eval (default all)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example for training and evaluation")
    p.add_argument("--epochs", type=float, default=1.0, help="distillation epochs (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of distillation and recovery")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--recover-steps", type=int, default=200, help="KD recovery steps after FFN pruning (default 200)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of hard-label CE in distillation")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="threads for every latency number (default 1)")
    p.add_argument("--bench-batch-size", type=int, default=1)
    p.add_argument("--bench-seq-len", type=int, default=128)
    p.add_argument("--bench-repeats", type=int, default=50, help="interleaved rounds of the final bench")
    p.add_argument("--prefer", default="balanced", help="among feasible: balanced (size x latency), size or latency")
    p.add_argument("--seed", type=int, default=42)


def run(args: argparse.Namespace) -> int:
    """``slimtune compress`` entry point: run, print the candidates table and the verdict."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = {f.name for f in dataclasses.fields(CompressSettings)}
    s = CompressSettings(**{k: v for k, v in vars(args).items() if k in names})
    summary = run_compress(s)

    ok = [c for c in summary["candidates"] if c.get("status") == "ok"]
    print(markdown_table(enrich(ok, next(c for c in ok if c["name"] == "input"))))
    for c in summary["candidates"]:
        if c.get("status") != "ok":
            print(f"- {c['name']}: {c['status']} ({c.get('reason')})")
    print()
    print(summary["verdict"])
    print(f"best: {Path(s.output) / 'best'}   report: {summary['report']}")
    return 0 if summary["meets_constraints"] else 1

