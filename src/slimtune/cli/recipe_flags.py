"""Flags of the recipe-based commands (``finetune``, ``distill``): each maps to a recipe key.

Precedence of settings: defaults < ``--config recipe.yaml`` < flags < ``key.path=value``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from slimtune.config.fields import deep_merge, load_yaml, parse_override, set_path
from slimtune.config.recipe import field_help, resolve
from slimtune.train import distributed

# flag name -> recipe key path
FINETUNE_FLAGS: dict[str, tuple[str, type, str]] = {
    "model": ("model.name", str, "model path, hub id or alias (minilm, minilm-l3, smollm2)"),
    "task": ("model.task", str, "classification | causal-lm"),
    "train": ("data.train", str, "training file (CSV/TSV/JSONL, or .txt for causal-lm)"),
    "eval": ("data.eval", str, "evaluation file"),
    "output": ("output", str, "output directory"),
    "method": ("method.name", str, "fine-tuning method (full, lora, ...)"),
    "epochs": ("train.epochs", float, "training epochs"),
    "max_steps": ("train.max_steps", int, "optimizer steps (overrides epochs)"),
    "batch_size": ("train.batch_size", int, "micro-batch size"),
    "grad_accum": ("train.grad_accum", int, "gradient accumulation steps"),
    "lr": ("train.lr", float, "peak learning rate"),
    "precision": ("train.precision", str, "auto | fp32 | bf16 | fp16"),
    "max_length": ("data.max_length", int, "max tokens per example / block"),
    "seed": ("train.seed", int, "random seed"),
    "text_column": ("data.text_column", str, "text column name"),
    "text_pair_column": ("data.text_pair_column", str, "second text column (pairs)"),
    "label_column": ("data.label_column", str, "label column name"),
    "max_train_samples": ("data.max_train_samples", int, "subsample the training set"),
    "max_eval_samples": ("data.max_eval_samples", int, "subsample the evaluation set"),
    "lora_r": ("method.r", int, "LoRA rank"),
    "lora_alpha": ("method.alpha", float, "LoRA alpha"),
}


def add_recipe_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[str, type, str]]) -> None:
    """Add ``--flag`` options that map to recipe keys, plus ``--config`` and overrides."""
    p.add_argument("--config", help="recipe YAML file (flags and key=value override it)")
    for name, (key, tp, help_) in flags.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=tp, default=None, help=f"{help_} [{key}]")
    p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip malformed rows and report the count [data.skip_bad_rows]")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="any recipe field, e.g. train.warmup_ratio=0.1")


def recipe_from_args(args: argparse.Namespace, flags: dict[str, tuple[str, type, str]],
                     base: dict[str, Any] | None = None) -> Any:
    """Merge defaults, ``--config``, flags and overrides into a validated Recipe."""
    tree: dict[str, Any] = dict(base or {})
    source = "command line"
    if args.config:
        tree = deep_merge(tree, load_yaml(args.config))
        source = args.config
    for name, (key, _, _) in flags.items():
        v = getattr(args, name, None)
        if v is not None:
            set_path(tree, key.split("."), v)
    if getattr(args, "skip_bad_rows", None):
        set_path(tree, ["data", "skip_bad_rows"], True)
    for ov in args.overrides or []:
        path, value = parse_override(ov)
        set_path(tree, path, value)
    return resolve(tree, source)


def recipe_epilog() -> str:
    """Every recipe key with its default and help: the ``--help`` epilog of ``finetune``."""
    lines = ["recipe keys (YAML sections, or key.path=value on the command line):"]
    for key, default, help_ in field_help():
        lines.append(f"  {key:<38} default {default:<10} {help_}")
    return "\n".join(lines)


def relaunch_training(args: argparse.Namespace, recipe: Any, command: str) -> int | None:
    """Check a training command's recipe, then re-launch the command as ``--nproc`` ranks if asked.

    Raises SystemExit when ``data.train`` or ``output`` is missing. Returns the exit code of
    ``torch.distributed.run`` when this process only launched the ranks, else None: the caller
    runs the job itself (single process, or one rank under torchrun).
    """
    if recipe.data.train is None:
        raise SystemExit(f"slimtune {command}: --train (data.train) is required")
    if recipe.output is None:
        raise SystemExit(f"slimtune {command}: --output is required")
    return distributed.relaunch(getattr(args, "argv", sys.argv[1:]), getattr(args, "nproc", None))


