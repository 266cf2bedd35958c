"""Quantization-aware recovery: a short fine-tune with fake-quantized weights.

When post-training int4 costs too much accuracy, train a few hundred steps with every selected
weight replaced in the forward pass by its quantize-dequantize image (same config, same code
as the final quantization), and gradients passed straight through the rounding (STE, Bengio
et al. 2013; the recipe of QAT in torchao/PyTorch). The weights learn to sit where rounding
hurts least; afterwards :func:`quantize_` is applied to the recovered float weights as usual.

It runs through THE training loop (``slimtune.train.loop.train``) as a method object: ``apply``
registers a ``torch.nn.utils.parametrize`` fake-quant on each weight, ``export`` removes it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.compress.quant.api import (
    decode_weight,
    default_filter,
    encode_weight,
    tied_weight_ids,
)
from slimtune.config.recipe import TrainConfig
from slimtune.train.loop import train


class FakeQuantize(nn.Module):
    """Parametrization ``w -> w + (dequant(quant(w)) - w).detach()``: quantized forward,
    identity gradient."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            qdq = decode_weight(*encode_weight(w.detach().float(), self.cfg)).to(w.dtype)
        return w + (qdq - w).detach()


class FakeQuantMethod:
    """A training method (the slimtune Method protocol) that fake-quantizes weights."""

    name = "qat"
    config_cls = object

    def apply(self, model: nn.Module, cfg: Any, ctx: Any = None) -> nn.Module:
        keep = default_filter(cfg, tied_weight_ids(model))
        for fqn, m in list(model.named_modules()):
            if fqn and isinstance(m, (nn.Linear, nn.Embedding)) and keep(m, fqn):
                parametrize.register_parametrization(m, "weight", FakeQuantize(cfg))
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def on_step_end(self, model: nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: nn.Module, cfg: Any, out_dir: Path | None = None, ctx: Any = None) -> nn.Module:
        """Drop the fake-quant, keeping the trained float (latent) weights."""
        for m in list(model.modules()):
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return model


def recover_(model: nn.Module, cfg: Any, train_data: Any, *, steps: int = 200, lr: float = 2e-5,
             batch_size: int = 16, seed: int = 0, work_dir: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``steps`` with ``cfg``'s weights fake-quantized.

    Args:
        model: float classifier (quantize it with ``quantize_(model, cfg)`` afterwards).
        cfg: the quantization config that will be applied (Int4WeightConfig, NF4Config, ...).
        train_data: tokenized labelled data (slimtune.data.datasets.TokenizedData).
        steps, lr, batch_size, seed: the short fine-tune.
        work_dir: where the loop may write its checkpoints (a temp folder by default).

    Returns the training loop's summary.
    """

    method = FakeQuantMethod()
    method.apply(model, cfg)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=0.1, precision="fp32",
                       eval_every=0, save_every=0, seed=seed, resume=False, tensorboard=False,
                       progress=False, log_every=max(1, steps // 10))
    model.train()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        summary = train(model, method, cfg, train_data, tcfg, Path(tmp), total_steps=steps)
    method.export(model, cfg)
    model.eval()
    return summary
