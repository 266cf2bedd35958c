"""slimtune quantize: quantize a classifier (int8 on the fastest CPU backend, int4, nf4, k-means)."""

from __future__ import annotations

import argparse
import sys

from slimtune.compress.quant.recipe import (
    BACKEND_CHOICES,
    SCHEMES,
    QuantizeError,
    format_summary,
    run_quantize,
)
from slimtune.compress.quant.storage import QuantizedFormatError
from slimtune.data.datasets import DataError
from slimtune.models.loading import ModelError


def run(args: argparse.Namespace) -> int:
    """``slimtune quantize`` entry point."""

    try:
        m = run_quantize(args.model, args.scheme, args.output, eval_path=args.eval,
                         granularity=args.granularity, group_size=args.group_size, bits=args.bits,
                         symmetric=args.symmetric, include_embeddings=not args.no_embeddings,
                         backend=args.backend, threads=args.threads, batch_size=args.batch_size,
                         seq_len=args.seq_len, repeats=args.repeats, min_sqnr_db=args.min_sqnr,
                         max_accuracy_drop=args.max_accuracy_drop, max_eval_samples=args.max_eval_samples,
                         export_dequantized=args.export_dequantized, qat_steps=args.qat_steps,
                         train_path=args.train, qat_lr=args.qat_lr, calib_path=args.calib,
                         calib_samples=args.calib_samples)
    except (QuantizeError, QuantizedFormatError, ModelError, DataError, FileNotFoundError) as e:
        print(f"slimtune quantize: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. a group size that does not divide a layer (names the layer)
        print(f"slimtune quantize: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(m))
    print(f"wrote {args.output} (metrics.json)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune quantize``."""
    p.add_argument("--model", required=True, help="fine-tuned classifier folder (plain HF)")
    p.add_argument("--scheme", required=True, choices=SCHEMES, help="quantization scheme")
    p.add_argument("--granularity", choices=("tensor", "channel", "group"), help="scale granularity (int8 default channel, int4 group, kmeans channel)")
    p.add_argument("--group-size", type=int, help="weights per scale for group granularity (int4 default 32); nf4 block size (64)")
    p.add_argument("--bits", type=int, help="kmeans: code width, 2**bits centroids (default 4)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="zero point 0 (int8 default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="min/max zero point (int4 default)")
    p.add_argument("--no-embeddings", action="store_true", help="leave embedding tables in float")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="int8 runtime; auto measures all and picks the fastest with parity")
    p.add_argument("--eval", help="labelled eval file for accuracy and logits SQNR")
    p.add_argument("--max-eval-samples", type=int, help="subsample the eval file")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--threads", type=int, default=1, help="threads for latency measurement (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="latency input batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=128, help="latency input length (default 128)")
    p.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds (default 30)")
    p.add_argument("--min-sqnr", type=float, default=20.0, help="logits SQNR (dB) a backend must reach to be chosen; "
                   "above what all-int8 ONNX Runtime reaches, a mixed-precision candidate is searched (default 20)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5, help="accuracy drop (points) a backend may cost")
    p.add_argument("--export-dequantized", action="store_true", help="also write OUTPUT/dequantized/ (plain float HF folder)")
    p.add_argument("--calib", help="int8: texts for the mixed-precision search (default: --train, else --eval)")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration rows (default 256)")
    p.add_argument("--qat-steps", type=int, default=0, help="int4/nf4/kmeans: fake-quant recovery fine-tune steps before quantizing (needs --train)")
    p.add_argument("--train", help="labelled training file for --qat-steps")
    p.add_argument("--qat-lr", type=float, default=2e-5, help="learning rate of the recovery fine-tune")

