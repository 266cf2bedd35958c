"""Check a recipe (keys, types, ranges, files) without loading any weights.

Catches everything ``finetune``/``distill``/``run`` would reject before training starts.
"""

from __future__ import annotations

import argparse

from slimtune.config.fields import deep_merge, load_yaml, parse_override, set_path
from slimtune.config.recipe import resolve
from slimtune.models.loading import check_exists
from slimtune.pipeline.run import validate_tree


def add_arguments(p: argparse.ArgumentParser) -> None:
    """A recipe file and optional ``key.path=value`` overrides."""
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


def run(args: argparse.Namespace) -> int:
    """Validate and print one OK line (or exit 2 with the reason)."""
    tree = load_yaml(args.recipe)
    for ov in args.overrides or []:
        path, value = parse_override(ov)
        set_path(tree, path, value)
    if "stages" in tree or "finetune" in tree:  # a `slimtune run` pipeline recipe
        plan = validate_tree(tree, args.recipe)
        print(f"{args.recipe}: OK (pipeline: {' -> '.join(plan.stages)}; output {plan.output})")
        return 0
    recipe = resolve(deep_merge({}, tree), args.recipe)
    check_exists(recipe.model.name)
    extra = ", distill" if recipe.distill is not None else ""
    print(f"{args.recipe}: OK (model {recipe.model.name}, task {recipe.model.task}, method {recipe.method_name}{extra})")
    return 0


