"""Build a student from the teacher (--student-layers N / --student-layer-map 0,2,5) or load one (--student DIR), then train it with alpha*CE + (1-alpha)*T^2*KL(teacher||student). Every recipe key has a flag (--teacher is model.name; the distill section's keys are distill.<field>, see docs/distillation.md); --print-config prints the resolved recipe and exits."""

from __future__ import annotations

import argparse
from typing import Any

from slimtune.cli.recipe_flags import (
    add_nproc,
    add_recipe_flags,
    recipe_flags,
    recipe_from_args,
    start_training,
)
from slimtune.compress.distill.recipe import run_distill
from slimtune.compress.distill.settings import DistillConfig
from slimtune.train import distributed
from slimtune.train.finetune import print_finetune_result


def distill_recipe_from_args(args: argparse.Namespace) -> tuple[Any, DistillConfig]:
    """Defaults < ``--config`` (may hold a ``distill`` section) < flags < ``key.path=value``.

    Returns the validated recipe (its ``distill`` always set) and that DistillConfig.
    """
    recipe = recipe_from_args(args, recipe_flags("distill"), base={"distill": {}})  # the section, with defaults
    return recipe, recipe.distill


def run(args: argparse.Namespace) -> int:
    """``slimtune distill``: build a student, distil, export, print the report."""
    recipe, dcfg = distill_recipe_from_args(args)
    rc = start_training(args, recipe)
    if rc is not None:  # --print-config, or this process only launched the ranks
        return rc
    try:
        result = run_distill(recipe, dcfg)
    finally:
        distributed.teardown()
    if not distributed.is_main():
        return 0
    print_finetune_result(result, recipe.output)
    if "teacher_accuracy" in result:
        print(f"\nteacher accuracy {result['teacher_accuracy']:.4f}   student {result['accuracy']:.4f}   "
              f"retention {result['retention']:.2%}   params {result['params']:,} vs {result['teacher_params']:,}")
    if "teacher_perplexity" in result:
        print(f"\nperplexity: teacher {result['teacher_perplexity']:.3f}   student before {result['perplexity_before']:.3f}"
              f"   after {result['perplexity']:.3f}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune distill``: every recipe key (``--teacher`` for ``model.name``), plus ``--nproc``."""
    add_recipe_flags(p, recipe_flags("distill"))
    add_nproc(p)
