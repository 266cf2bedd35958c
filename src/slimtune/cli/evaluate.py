"""Evaluate any output folder on a labelled file (or LM text): per-class report and metrics.json. Every flag is a field of slimtune.evaluate.evaluator.EvaluateSettings (the evaluate: section of a pipeline recipe, which --config reads); the resolved settings are written beside the metrics as OUTPUT.evaluate.yaml."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings, save_beside
from slimtune.cli.lists import require
from slimtune.evaluate.evaluator import EvaluateSettings, format_report, run_evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluate`` flags: ``--config``, one per :class:`EvaluateSettings` field, ``--print-config``."""
    add_settings_arguments(p, EvaluateSettings)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the report, write metrics.json and the settings beside it."""
    s = resolve_settings(EvaluateSettings, args, "evaluate")
    require(s, ("model", "eval"))
    if print_config(args, s):
        return 0
    kw = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("model", "eval")}
    result = run_evaluate(s.model, s.eval, **kw)
    print(format_report(result, title=f"{s.model} on {s.eval}"))
    save_beside(s, s.output or Path(s.model) / "metrics.json", "evaluate")
    return 0
