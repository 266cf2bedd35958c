"""Prune a fine-tuned classifier or a causal LM and write a smaller model that plain transformers loads. A causal LM stays a causal LM: depth (--layers/--keep-layers, block influence), width (--ffn, --heads: whole KV groups), vocabulary (--vocab, exact on the task text), then recovery (--recover-steps, --kd). Classifiers: zeros from --sparsity do not shrink model.safetensors or speed up dense CPU inference; --layers/--ffn/--vocab-from do. OUT/prune.yaml holds the settings (--config repeats the run)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.compress.prune.decoder_arch import DecoderPruneError
from slimtune.compress.prune.recipe import SETTINGS_FILE, PruneSettings, run_prune
from slimtune.compress.prune.structured import StructuredPruneError
from slimtune.compress.prune.vocab import VocabPruneError
from slimtune.config.fields import RecipeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune prune``: ``--config``, one flag per :class:`PruneSettings` field, ``--print-config``."""
    add_settings_arguments(p, PruneSettings)


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("params", f"{r['params_before']:,} -> {r['params']:,} ({r['params_ratio']:.2f}x fewer)"),
            ("size on disk", f"{r['size_mb']:.1f} MB")]
    if "architecture" in r:
        a, b = r["architecture_before"], r["architecture"]
        rows.append(("shape", " ".join(f"{k} {b[k]:,}" + (f" (was {a[k]:,})" if a[k] != b[k] else "")
                                       for k in ("layers", "heads", "kv_heads", "intermediate", "vocab"))))
    if "perplexity" in r:
        rows.append(("perplexity", f"{r['perplexity']:.3f} on {r['eval_file']} ({r.get('perplexity_of', 'all tokens')})"))
    for key in ("exact_match", "accuracy"):
        if key in r:
            rows.append((key, f"{r[key]:.4f} on {r['eval_file']} (n={r.get('n', r.get('generated'))})"))
    if "sparsity" in r:
        side = r["sparsity"].get("sparse_sidecar") or {}
        rows.append(("sparsity", f"{r['sparsity']['pruned_weights_sparsity']:.1%} of block weights; zeros do not "
                                 f"shrink model.safetensors" + (f"; sparse/ copy {side['bytes'] / 1e6:.1f} MB"
                                                                if side.get("written") else "")))
    return rows


def run(args: argparse.Namespace) -> int:
    """``slimtune prune`` entry point: prune, print the sizes (and accuracy / perplexity) and where it was written."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = resolve_settings(PruneSettings, args, "prune")
    if print_config(args, s):
        return 0
    try:
        r = run_prune(s)
    except (StructuredPruneError, VocabPruneError, DecoderPruneError) as e:  # user-facing: one line, no traceback
        raise RecipeError(str(e)) from None
    for k, v in _rows(r):
        print(f"{k:<14} {v}")
    print(f"written to {s.output} ({SETTINGS_FILE}: the settings)")
    return 0
