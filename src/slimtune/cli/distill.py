"""Build a student from the teacher (--student-layers N / --student-layer-map 0,2,5) or load one (--student DIR), then train it with alpha*CE + (1-alpha)*T^2*KL(teacher||student). Recipe keys of the distill section: distill.<field> (see docs/distillation.md)."""

from __future__ import annotations

import argparse
from typing import Any

from slimtune.cli.recipe_flags import (
    FINETUNE_FLAGS,
    add_recipe_flags,
    recipe_from_args,
    relaunch_training,
)
from slimtune.compress.distill.recipe import run_distill
from slimtune.compress.distill.settings import DistillConfig
from slimtune.train import distributed
from slimtune.train.finetune import print_finetune_result

DISTILL_ONLY_FLAGS: dict[str, tuple[str, type, str]] = {
    "student": ("distill.student", str, "student model folder or alias, e.g. minilm-l3 (instead of building one)"),
    "student_layers": ("distill.student_layers", int, "keep N evenly spaced teacher layers"),
    "student_layer_map": ("distill.student_layer_map", str, "teacher layers to keep, e.g. 0,2,5"),
    "student_hidden_size": ("distill.student_hidden_size", int, "narrower student (fresh init)"),
    "alpha": ("distill.alpha", float, "weight of hard-label CE (1 = no KD)"),
    "temperature": ("distill.temperature", float, "softmax temperature T"),
    "kl_direction": ("distill.kl_direction", str, "forward | reverse"),
    "logit_loss": ("distill.logit_loss", str, "kl | mse (soft term on the logits)"),
    "hidden_weight": ("distill.hidden_weight", float, "weight of hidden-state MSE"),
    "attention_weight": ("distill.attention_weight", float, "weight of attention-map KL"),
    "teacher_dtype": ("distill.teacher_dtype", str, "float32 | bfloat16"),
    "teacher_cache": ("distill.teacher_cache", str, "auto | on | off"),
    "cache_dir": ("distill.cache_dir", str, "teacher-logit cache folder"),
    "unlabeled": ("distill.unlabeled", str, "transfer set: comma-separated files learnt from soft labels only"),
    "max_unlabeled_samples": ("distill.max_unlabeled_samples", int, "rows of the transfer set to keep"),
}


def distill_flags() -> dict[str, tuple[str, type, str]]:
    """``slimtune distill`` flags: the fine-tune flags (``--teacher`` for the model) + distill ones."""

    flags = {"teacher": ("model.name", str, "teacher: fine-tuned model folder or alias")}
    flags.update({k: v for k, v in FINETUNE_FLAGS.items() if k not in ("model", "lora_r", "lora_alpha")})
    flags.update(DISTILL_ONLY_FLAGS)
    return flags


def distill_recipe_from_args(args: argparse.Namespace) -> tuple[Any, DistillConfig]:
    """Defaults < ``--config`` (may hold a ``distill`` section) < flags < ``key.path=value``.

    Returns the validated recipe (its ``distill`` always set) and that DistillConfig.
    """

    # --intermediate is a store_true flag (True or None), so it maps like the valued flags.
    flags = {**distill_flags(), "intermediate": ("distill.intermediate", bool, "")}
    recipe = recipe_from_args(args, flags, base={"distill": {}})  # the section with defaults if absent
    return recipe, recipe.distill


def run(args: argparse.Namespace) -> int:
    """``slimtune distill``: build a student, distil, export, print the report."""

    recipe, dcfg = distill_recipe_from_args(args)
    rc = relaunch_training(args, recipe, "distill")
    if rc is not None:  # this process only launched the ranks (torch.distributed.run)
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
    """Register ``slimtune distill``."""

    add_recipe_flags(p, distill_flags())
    p.add_argument("--intermediate", action="store_true", default=None,
                   help="also match hidden states and attention maps [distill.intermediate]")
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine (torch.distributed.run; see docs/distributed.md)")

