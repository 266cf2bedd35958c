"""Fine-tune a model (full, LoRA, AdaLoRA, IA3, adapters, sharing, magnitude) on a data file.

Settings: defaults < --config recipe.yaml < flags < key.path=value (every recipe key is listed below).
"""

from __future__ import annotations

import argparse

from slimtune.cli.recipe_flags import (
    FINETUNE_FLAGS,
    add_recipe_flags,
    recipe_epilog,
    recipe_from_args,
    relaunch_training,
)
from slimtune.config.fields import RecipeError
from slimtune.train import distributed
from slimtune.train.finetune import print_finetune_result, run_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` flags: every recipe key, plus ``--nproc``."""
    add_recipe_flags(p, FINETUNE_FLAGS)
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine, launched with torch.distributed.run "
                        "(train.batch_size stays the global batch; see docs/distributed.md)")
    p.epilog = recipe_epilog()


def run(args: argparse.Namespace) -> int:
    """Fine-tune, export and print the result table."""
    recipe = recipe_from_args(args, FINETUNE_FLAGS)
    if recipe.distill is not None:  # fine-tuning it would train the teacher (model.name), not a student
        raise RecipeError(f"{args.config or 'recipe'}: has a 'distill' section (a slimtune distill recipe); "
                          "run it with 'slimtune distill --config', or remove the section")
    rc = relaunch_training(args, recipe, "finetune")
    if rc is not None:  # this process only launched the ranks (torch.distributed.run)
        return rc
    try:
        result = run_finetune(recipe)
        if distributed.is_main():
            print_finetune_result(result, recipe.output)
    finally:
        distributed.teardown()
    return 0


