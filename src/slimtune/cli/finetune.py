"""Fine-tune a model (full, LoRA, AdaLoRA, IA3, adapters, sharing, magnitude) on a data file.

Settings: defaults < --config recipe.yaml < flags < key.path=value. Every recipe key has a flag
(listed below with its recipe key); --print-config prints the resolved recipe and exits.
"""

from __future__ import annotations

import argparse

from slimtune.cli.recipe_flags import (
    add_nproc,
    add_recipe_flags,
    recipe_epilog,
    recipe_flags,
    recipe_from_args,
    start_training,
)
from slimtune.config.fields import RecipeError
from slimtune.config.recipe import Recipe
from slimtune.train import distributed
from slimtune.train.finetune import print_finetune_result, run_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` flags: every recipe key, plus ``--nproc``."""
    add_recipe_flags(p, recipe_flags("finetune"))
    add_nproc(p)
    p.epilog = recipe_epilog()


def finetune_recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The validated recipe of parsed ``slimtune finetune`` arguments (a distill recipe is refused)."""
    recipe = recipe_from_args(args, recipe_flags("finetune"))
    if recipe.distill is not None:  # fine-tuning it would train the teacher (model.name), not a student
        raise RecipeError(f"{args.config or 'recipe'}: has a 'distill' section (a slimtune distill recipe); "
                          "run it with 'slimtune distill --config', or remove the section")
    return recipe


def run(args: argparse.Namespace) -> int:
    """Fine-tune, export and print the result table."""
    recipe = finetune_recipe_from_args(args)
    rc = start_training(args, recipe)
    if rc is not None:  # --print-config, or this process only launched the ranks
        return rc
    try:
        result = run_finetune(recipe)
        if distributed.is_main():
            print_finetune_result(result, recipe.output)
    finally:
        distributed.teardown()
    return 0
