"""LoRA through PEFT: low-rank updates on the linear layers, the task head trained in full.

Exports both forms: the merged model (``config.json`` + ``model.safetensors``, plain
transformers) in the output folder, and the adapter alone in PEFT format under ``adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base, DIR/adapter)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.config.fields import RecipeError
from slimtune.methods import MethodContext, register_method


@dataclass
class LoraMethodConfig:
    """LoRA (Hu et al., 2021) via PEFT."""

    r: int = field(default=16, metadata={"help": "lora: rank of the update matrices (flag --lora-r)."})
    alpha: float = field(default=32.0, metadata={"help": "lora: scaling numerator; the update is scaled by alpha / r (flag --lora-alpha)."})
    dropout: float = field(default=0.05, metadata={"help": "lora: dropout on the LoRA input."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "lora: module names to adapt; None: every linear layer of the transformer blocks (detected per architecture)."})
    export: Literal["both", "merged", "adapter"] = field(default="both", metadata={"help": "lora: what to write: merged model, PEFT adapter under adapter/, or both."})

    def validate(self, recipe: Any) -> None:

        if self.r < 1:
            raise RecipeError(f"method.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise RecipeError(f"method.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecipeError(f"method.dropout: must be in [0, 1), got {self.dropout}")


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


class LoraMethod:
    name = "lora"
    config_cls = LoraMethodConfig

    def apply(self, model: torch.nn.Module, cfg: LoraMethodConfig, ctx: MethodContext) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model  # optional dependency (the peft extra)

        config = LoraConfig(
            task_type=peft_task_type(ctx.task),
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules or default_target_modules(model),
            base_model_name_or_path=ctx.base_model,
        )
        return get_peft_model(model, config)

    def on_step_end(self, model: torch.nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: torch.nn.Module, cfg: LoraMethodConfig, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        return export_peft(model, out_dir, cfg.export, ctx.base_model)


register_method(LoraMethod())
