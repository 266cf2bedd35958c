"""Accuracy-constrained search over student depth (distill), vocabulary and FFN pruning (prune) and int8 ONNX Runtime (quantize) under a time budget. Every candidate is kept; all are timed side by side at the end; OUT/best/ is the smallest/fastest that meets the constraints. Every flag is a field of slimtune.pipeline.search.CompressSettings; the resolved settings are written to OUT/compress.yaml, which --config reads back."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.cli.lists import comma_lists
from slimtune.pipeline.search import CompressSettings, run_compress
from slimtune.pipeline.search_decoder import run_decoder_compress
from slimtune.report.html import enrich, markdown_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune compress``: ``--config``, one flag per :class:`CompressSettings` field, ``--print-config``."""
    add_settings_arguments(p, CompressSettings)
    comma_lists(p, ("depths", "ffn", "quant", "static_dims", "keep_layers"))


def run(args: argparse.Namespace) -> int:
    """``slimtune compress`` entry point: run, print the candidates table and the verdict (exit 1 on a miss)."""

    s = resolve_settings(CompressSettings, args, "compress")  # every flag and file checked here
    if print_config(args, s):
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = (run_decoder_compress if s.decoder else run_compress)(s)  # writes OUT/compress.yaml first

    ok = [c for c in summary["candidates"] if c.get("status") == "ok"]
    print(markdown_table(enrich(ok, next(c for c in ok if c["name"] == "input"))))
    for c in summary["candidates"]:
        if c.get("status") != "ok":
            print(f"- {c['name']}: {c['status']} ({c.get('reason')})")
    print()
    print(summary["verdict"])
    print(f"best: {Path(s.output) / 'best'}   report: {summary['report']}")
    return 0 if summary["meets_constraints"] else 1
