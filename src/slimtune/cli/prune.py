"""Prune a fine-tuned sequence classifier and write a smaller model that plain transformers loads. Zeros from --sparsity do not shrink model.safetensors or speed up dense CPU inference; --heads/--ffn/--vocab-from do."""

from __future__ import annotations

import argparse
import dataclasses
import os

from slimtune.compress.prune.recipe import PruneSettings, run_prune
from slimtune.compress.prune.structured import StructuredPruneError
from slimtune.compress.prune.vocab import VocabPruneError
from slimtune.config.fields import RecipeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``slimtune prune`` to the ``slimtune`` parser."""
    p.add_argument("--model", required=True, help="fine-tuned model folder (config.json + weights + tokenizer)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--train", help="training file: recovery fine-tuning and taylor importance")
    p.add_argument("--eval", help="labelled file for the accuracy in metrics.json")
    p.add_argument("--sparsity", type=float, default=0.0, help="unstructured magnitude sparsity of the block weights (0.5 = half zeros)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4 (GPU sparse tensor cores only)")
    p.add_argument("--scope", choices=["global", "layer"], default="global", help="one magnitude threshold for all layers, or per layer")
    p.add_argument("--schedule", choices=["gradual", "oneshot"], default="gradual", help="cubic schedule over the recovery steps, or all at once")
    p.add_argument("--heads", type=float, default=0.0, help="refused with the reason: plain transformers cannot reload fewer heads per BERT layer (use --layers)")
    p.add_argument("--layers", type=int, default=0, help="number of whole transformer layers to remove (chosen greedily by logit change)")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons to remove in every layer")
    p.add_argument("--importance", choices=["taylor", "magnitude"], default="taylor", help="how heads/neurons are ranked")
    p.add_argument("--importance-batches", type=int, default=8, help="training batches for taylor importance")
    p.add_argument("--vocab-from", nargs="+", default=[], metavar="FILE", help="keep only tokens used in these files (+ specials)")
    p.add_argument("--vocab-min-count", type=int, default=1, help="drop tokens seen fewer times (1 keeps corpus tokenization identical)")
    p.add_argument("--no-vocab-chars", action="store_true", help="do not keep single ASCII characters for unseen words")
    p.add_argument("--recover-steps", type=int, default=0, help="recovery fine-tuning steps after pruning")
    p.add_argument("--kd", action="store_true", help="distil from the unpruned model during recovery (logit KL)")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the KD term (1 - alpha on cross-entropy)")
    p.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-threads", type=int, default=0)
    p.add_argument("--sparse-sidecar", choices=["auto", "on", "off"], default="auto",
                   help="bitmask copy of sparse weights under sparse/ (auto: only when smaller)")


def settings_from_args(args: argparse.Namespace) -> PruneSettings:
    """The :class:`PruneSettings` of parsed ``slimtune prune`` arguments."""
    names = {f.name for f in dataclasses.fields(PruneSettings)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["vocab_keep_chars"] = not args.no_vocab_chars
    return PruneSettings(**kw)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    s = settings_from_args(args)
    try:
        r = run_prune(s)
    except (StructuredPruneError, VocabPruneError) as e:  # user-facing: one line, no traceback
        raise RecipeError(str(e)) from None
    rows = [("params", f"{r['params_before']:,} -> {r['params']:,} ({r['params_ratio']:.2f}x fewer)"),
            ("size on disk", f"{r['size_mb']:.1f} MB")]
    if "accuracy" in r:
        rows.append(("accuracy", f"{r['accuracy']:.4f} on {r['eval_file']} (n={r['n']})"))
    if "sparsity" in r:
        side = r["sparsity"].get("sparse_sidecar") or {}
        rows.append(("sparsity", f"{r['sparsity']['pruned_weights_sparsity']:.1%} of block weights; zeros do not "
                                 f"shrink model.safetensors" + (f"; sparse/ copy {side['bytes'] / 1e6:.1f} MB"
                                                                if side.get("written") else "")))
    for k, v in rows:
        print(f"{k:<14} {v}")
    print(f"written to {s.output}")
    return 0

