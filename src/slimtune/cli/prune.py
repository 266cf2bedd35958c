"""Prune a fine-tuned sequence classifier and write a smaller model that plain transformers loads. Zeros from --sparsity do not shrink model.safetensors or speed up dense CPU inference; --layers/--ffn/--vocab-from do. OUT/prune.yaml holds the settings (--config repeats the run)."""

from __future__ import annotations

import argparse
import os

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.compress.prune.recipe import SETTINGS_FILE, PruneSettings, run_prune
from slimtune.compress.prune.structured import StructuredPruneError
from slimtune.compress.prune.vocab import VocabPruneError
from slimtune.config.fields import RecipeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune prune``: ``--config``, one flag per :class:`PruneSettings` field, ``--print-config``."""
    add_settings_arguments(p, PruneSettings)


def run(args: argparse.Namespace) -> int:
    """``slimtune prune`` entry point: prune, print the sizes (and accuracy) and where it was written."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = resolve_settings(PruneSettings, args, "prune")
    if print_config(args, s):
        return 0
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
    print(f"written to {s.output} ({SETTINGS_FILE}: the settings)")
    return 0
