"""Check a recipe without loading any weights: keys, types, ranges, files, and what the run would
read (data columns and labels; for a distill recipe the teacher's layers and classes from its
config, and the student's tokenizer).

Catches everything ``finetune``/``distill``/``run`` would reject before training starts. The recipe
is RECIPE or --config RECIPE; --print-config prints it resolved (defaults filled in) and exits.
"""

from __future__ import annotations

import argparse
from typing import Any

from slimtune.cli.common import add_print_config, print_config
from slimtune.compress.distill.recipe import check_distill_inputs
from slimtune.config.fields import RecipeError, deep_merge, load_yaml, parse_override, set_path
from slimtune.config.outputs import check_output
from slimtune.config.recipe import resolve
from slimtune.models.loading import check_exists
from slimtune.pipeline.run import validate_tree
from slimtune.train.finetune import check_data


def add_arguments(p: argparse.ArgumentParser) -> None:
    """A recipe file (positional or ``--config``), ``--print-config`` and ``key.path=value`` overrides."""
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="recipe YAML: a finetune/distill recipe (e.g. OUT/recipe.yaml) or a pipeline recipe")
    p.add_argument("--config", metavar="YAML", help="the recipe file, like the other commands' --config (instead of RECIPE)")
    add_print_config(p)
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. train.lr=1e-4")


def _recipe_tree(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(recipe path, its tree with the overrides applied)."""
    overrides = list(args.overrides or [])
    path = args.config or args.recipe
    if args.config and args.recipe is not None:
        if "=" not in args.recipe:
            raise RecipeError(f"give the recipe once: RECIPE ({args.recipe}) or --config ({args.config})")
        overrides.insert(0, args.recipe)  # argparse put the first override in RECIPE's place
    if path is None:
        raise RecipeError("no recipe given: slimtune validate RECIPE.yaml (or --config RECIPE.yaml)")
    tree = load_yaml(path)
    for ov in overrides:
        key, value = parse_override(ov)
        set_path(tree, key, value)
    return path, tree


def run(args: argparse.Namespace) -> int:
    """Validate and print one OK line (or the resolved recipe), or exit 2 with the reason."""
    path, tree = _recipe_tree(args)
    if "stages" in tree or "finetune" in tree:  # a `slimtune run` pipeline recipe
        plan = validate_tree(tree, path)
        if print_config(args, tree):
            return 0
        print(f"{path}: OK (pipeline: {' -> '.join(plan.stages)}; output {plan.output})")
        return 0
    recipe = resolve(deep_merge({}, tree), path)
    check_exists(recipe.model.name)
    if recipe.output:  # a finished run there is refused without overwrite, as the run would
        check_output(recipe.output, overwrite=recipe.overwrite,
                     inputs=(recipe.model.name, getattr(recipe.distill, "student", None)))
    labels = check_data(recipe)  # columns, rows and labels, as the run will read them
    if recipe.distill is not None:
        check_distill_inputs(recipe, recipe.distill, labels)
    if print_config(args, recipe.to_dict()):
        return 0
    extra = ", distill" if recipe.distill is not None else ""
    print(f"{path}: OK (model {recipe.model.name}, task {recipe.model.task}, method {recipe.method_name}{extra})")
    return 0
