"""Evaluate any output folder on a labelled file (or LM text): per-class report and metrics.json."""

from __future__ import annotations

import argparse

from slimtune.evaluate.evaluator import format_report, run_evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluate`` flags."""
    p.add_argument("--model", required=True, help="model folder written by slimtune (or any HF folder)")
    p.add_argument("--eval", required=True, help="evaluation file (CSV/TSV/JSONL, or .txt for causal-lm)")
    p.add_argument("--output", help="metrics JSON to write (default: MODEL/metrics.json)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None, help="default: the model's recipe.yaml, else 128")
    p.add_argument("--text-column")
    p.add_argument("--text-pair-column")
    p.add_argument("--label-column")
    p.add_argument("--encoding", default=None)
    p.add_argument("--skip-bad-rows", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the report and write metrics.json."""
    result = run_evaluate(args.model, args.eval, output=args.output, batch_size=args.batch_size,
                          max_length=args.max_length, text_column=args.text_column,
                          text_pair_column=args.text_pair_column, label_column=args.label_column,
                          encoding=args.encoding, skip_bad_rows=args.skip_bad_rows)
    print(format_report(result, title=f"{args.model} on {args.eval}"))
    return 0


