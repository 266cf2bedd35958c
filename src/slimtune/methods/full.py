"""Full fine-tuning: every weight trains (optionally with the embeddings frozen)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.config.fields import setting
from slimtune.methods import MethodContext, register_method


@dataclass
class FullConfig:
    """Full fine-tuning."""

    freeze_embeddings: bool = setting(False, "full: keep the input embeddings frozen (saves optimizer memory; the embedding matrix is ~half of a small encoder).")


class FullMethod:
    name = "full"
    config_cls = FullConfig

    def apply(self, model: torch.nn.Module, cfg: FullConfig, ctx: MethodContext) -> torch.nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def on_step_end(self, model: torch.nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: torch.nn.Module, cfg: FullConfig, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        model.save_pretrained(out_dir)
        return model

    def load_exported(self, path: Path, task: str, dtype: str) -> None:
        """None: the export is a plain transformers folder."""
        return None


register_method(FullMethod())
