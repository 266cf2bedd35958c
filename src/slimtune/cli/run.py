"""Run the stages of a pipeline recipe (any subset, in order), each feeding the next; every stage's folder is kept (OUT/01-finetune, ...). Unchanged stages are skipped on re-runs (stage.json), so a failed run resumes where it stopped. See docs/pipeline.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from slimtune.pipeline.run import load_plan, run_pipeline
from slimtune.report.html import markdown_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune run``."""
    p.add_argument("recipe", help="pipeline recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. distill.student_layers=2 output=out/x")
    p.add_argument("--force", action="store_true", help="rerun every stage even if unchanged")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan (which stages would run)")


def run(args: argparse.Namespace) -> int:
    """``slimtune run`` entry point."""

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plan = load_plan(args.recipe, args.overrides)
    if args.dry_run:
        print(f"{args.recipe}: OK; output {plan.output}")
        for s in plan.stages:
            d = plan.stage_dir(s)
            state = json.loads((d / "stage.json").read_text()).get("status") if (d / "stage.json").is_file() else "new"
            print(f"  {d.name:<14} {state}")
        return 0
    result = run_pipeline(plan, force=args.force)
    for s in result["stages"]:
        what = "skipped (unchanged)" if s.get("skipped") else f"ran in {s['seconds']:.0f} s"
        print(f"{s['stage']:<10} {what}")
    if result["rows"]:

        print()
        print(markdown_table(result["rows"]))
        print(f"\nreport: {Path(result['output']) / 'report.html'}")
    return 0

