"""Benchmark one or more model folders (fp32 HF, pruned, quantized, ONNX) in one run: every setting times all models interleaved, so ratios are fair. Ratios are vs the first --model."""

from __future__ import annotations

import argparse
import os
from typing import Any

from slimtune.benchmark.latency import bench_models, format_bench
from slimtune.io import atomic_write_json


def _int_list(text: str) -> list[int]:

    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune bench``."""
    p.add_argument("--model", nargs="+", required=True, metavar="DIR", help="model folders (first = reference)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1], help="comma-separated (default 1)")
    p.add_argument("--seq-lens", type=_int_list, default=[128], help="comma-separated (default 128)")
    p.add_argument("--threads", type=_int_list, default=[1], help="comma-separated intra-op threads (default 1)")
    p.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per model first (default 5)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="keep timing at least this long per setting")
    p.add_argument("--eval", help="labelled file: also report accuracy/macro-F1 of each model")
    p.add_argument("--max-eval-samples", type=int, help="evaluate on the first N rows only")
    p.add_argument("--output", help="write the full result as JSON here")


def run(args: Any) -> int:
    """``slimtune bench`` entry point: print the Markdown table, optionally write JSON."""

    if args.repeats < 1:
        raise SystemExit("slimtune bench: --repeats must be >= 1")
    names: dict[str, str] = {}
    for d in args.model:
        name = os.path.basename(os.path.normpath(d)) or d
        while name in names:  # two folders with the same basename
            name += "'"
        names[name] = d
    result = bench_models(names, batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, threads=args.threads,
                          repeats=args.repeats, warmup=args.warmup, min_seconds=args.min_seconds,
                          eval_path=args.eval, max_eval_samples=args.max_eval_samples)
    print(format_bench(result))
    if args.output:
        atomic_write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0

