"""Run the stages of a pipeline recipe (any subset, in order), each feeding the next; every stage's folder is kept (OUT/01-finetune, ...). Unchanged stages are skipped on re-runs (stage.json), so a failed run resumes where it stopped. The recipe is RECIPE or --config (e.g. OUT/run.yaml of an earlier run: the resolved recipe, written before any stage runs); --print-config prints it resolved and exits. See docs/pipeline.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from slimtune.cli.common import add_print_config, print_config
from slimtune.config.fields import RecipeError
from slimtune.io import atomic_write_text
from slimtune.pipeline.run import Plan, load_plan, resolved_tree, run_pipeline
from slimtune.report.html import markdown_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune run``: the recipe (positional or ``--config``), overrides and run switches."""
    p.add_argument("recipe", nargs="?", help="pipeline recipe YAML (or give it as --config)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. distill.student_layers=2 output=out/x")
    p.add_argument("--config", metavar="YAML", help="the pipeline recipe, instead of RECIPE (e.g. OUT/run.yaml)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if unchanged")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan (which stages would run)")
    add_print_config(p)


def recipe_and_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The recipe file (RECIPE or ``--config``) and the ``key.path=value`` overrides.

    With ``--config``, argparse puts a first override in the RECIPE slot; it is moved back.
    """
    overrides = list(args.overrides or [])
    if args.config is None:
        if args.recipe is None:
            raise RecipeError("RECIPE: a pipeline recipe is required (positional, or --config)")
        return args.recipe, overrides
    if args.recipe is not None:
        if "=" not in args.recipe or Path(args.recipe).is_file():
            raise RecipeError(f"give the recipe once: {args.recipe} and --config {args.config}")
        overrides.insert(0, args.recipe)
    return args.config, overrides


def _print_dry_run(source: str, plan: Plan) -> None:
    print(f"{source}: OK; output {plan.output}")
    for s in plan.stages:
        d = plan.stage_dir(s)
        state = json.loads((d / "stage.json").read_text()).get("status") if (d / "stage.json").is_file() else "new"
        print(f"  {d.name:<14} {state}")


def run(args: argparse.Namespace) -> int:
    """``slimtune run`` entry point: validate the whole recipe, write OUT/run.yaml, run the stages."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source, overrides = recipe_and_overrides(args)
    plan = load_plan(source, overrides)  # the WHOLE recipe, before any weight loads
    tree = resolved_tree(plan)
    if print_config(args, tree):
        return 0
    if args.dry_run:
        _print_dry_run(source, plan)
        return 0
    plan.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.output / "run.yaml", yaml.safe_dump(tree, sort_keys=False))  # --config reads it back
    result = run_pipeline(plan, force=args.force)
    for s in result["stages"]:
        what = "skipped (unchanged)" if s.get("skipped") else f"ran in {s['seconds']:.0f} s"
        print(f"{s['stage']:<10} {what}")
    if result["rows"]:
        print()
        print(markdown_table(result["rows"]))
        print(f"\nreport: {Path(result['output']) / 'report.html'}")
    return 0
