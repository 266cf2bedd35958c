"""LoRA through PEFT: low-rank updates on the linear layers, the task head trained in full.

Exports both forms: the merged model (``config.json`` + ``model.safetensors``, plain
transformers) in the output folder, and the adapter alone in PEFT format under ``adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base, DIR/adapter)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.config.fields import setting
from slimtune.methods import MethodContext, register_method
from slimtune.methods._peft import default_target_modules, export_peft, peft_task_type


@dataclass
class LoraMethodConfig:
    """LoRA (Hu et al., 2021) via PEFT."""

    r: int = setting(16, "lora: rank of the update matrices (flag --lora-r).", ge=1)
    alpha: float = setting(32.0, "lora: scaling numerator; the update is scaled by alpha / r (flag --lora-alpha).", gt=0)
    dropout: float = setting(0.05, "lora: dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] | None = setting(None, "lora: module names to adapt; None: every linear layer of the transformer blocks (detected per architecture).")
    export: Literal["both", "merged", "adapter"] = setting("both", "lora: what to write: merged model, PEFT adapter under adapter/, or both.")



class LoraMethod:
    # LoRA trains low-rank factors from B = 0: it needs a 10x higher rate than full fine-tuning
    # (PEFT's examples: 1e-4..1e-3; SST-2 here: 0.51 at 5e-5, 0.82 at 1e-3). Decoders: 2e-4
    # (QLoRA paper, PEFT causal-LM examples).
    defaults = {"train.lr": 1e-3, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.lr": 2e-4, "train.min_steps": 0}}
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

    def load_exported(self, path: Path, task: str, dtype: str) -> None:
        """None: the export is a plain transformers folder."""
        return None


register_method(LoraMethod())
