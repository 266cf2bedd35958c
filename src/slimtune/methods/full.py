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
    # Peak lr 1e-4: a small encoder (MiniLM) fine-tuned in full (HF Trainer at 1e-4 on 8k SST-2
    # rows: 0.84-0.86; bench/results/peft_methods.json: 0.837 at 4k rows, 1 epoch). The step
    # floor keeps a 2k-row file from stopping at 189 steps. Decoders keep the old 5e-5.
    defaults = {"train.lr": 1e-4, "train.epochs": 3.0, "train.min_steps": 300}
    task_defaults = {"causal-lm": {"train.lr": 5e-5, "train.min_steps": 0}}
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
