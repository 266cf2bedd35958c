"""PEFT glue shared by the PEFT-backed methods (LoRA, AdaLoRA, IA3, QLoRA): task type, default
target modules, and the adapter + merged export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def peft_task_type(task: str) -> str:
    """PEFT's task type for a slimtune task (decides which head goes in modules_to_save)."""
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside the transformer blocks.

    The task head (classifier/score/lm_head) and the pooler are excluded: the head trains in
    full through ``modules_to_save``, and tied output embeddings must stay tied. Full names,
    not last components: PEFT matches by suffix, so ``dense`` would also catch ``pooler.dense``.
    """
    excluded = ("classifier", "score", "lm_head", "pooler", "pre_classifier")
    names = [full_name for full_name, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and not any(part in excluded for part in full_name.split("."))]
    if not names:
        raise ValueError("no linear layers found to adapt; set method.target_modules")
    return sorted(names)


def export_peft(model: Any, out_dir: Path, export: str, base_model: str) -> torch.nn.Module:
    """Write a PEFT model as adapter (``out_dir/adapter``) and/or merged plain model."""
    if export in ("both", "adapter"):
        model.peft_config["default"].base_model_name_or_path = base_model
        model.save_pretrained(out_dir / "adapter")
    merged = model.merge_and_unload()
    if export in ("both", "merged"):
        merged.save_pretrained(out_dir)
    return merged
