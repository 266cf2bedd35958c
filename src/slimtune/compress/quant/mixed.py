"""Sensitivity-guided mixed precision for dynamic int8 (which layers keep float activations).

Dynamic int8 backends on CPU (ONNX Runtime, fbgemm) quantize each Linear's *input* with one
scale per tensor. Encoders have a few tokens with massive activations ([CLS]/[SEP]-like
outliers, Sun et al. 2024 "Massive activations"), so in some layers one token sets the scale
for all and the rest lose most of their resolution. On MiniLM-SST-2 per-token scales would give
~37 dB logits SQNR, per-tensor ~25 dB; nearly all the loss comes from a few FFN layers.

Plan: rank every Linear by what quantizing its input alone does to the logits (one calibration
pass per layer), then keep float activations for the worst layers, one at a time, until the
real int8 model reaches the SQNR target on calibration data. Those layers still store int8 weights (weight-only
int8, decoded in the graph), so the size stays ~4x smaller.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.compress.quant.linear import sqnr_db
from slimtune.runtime.predict import predict_all as _pa
from slimtune.runtime.predict import torch_predict


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """uint8 asymmetric per-tensor quantize-dequantize, as ORT's DynamicQuantizeLinear does."""
    lo, hi = x.amin().clamp_max(0), x.amax().clamp_min(0)
    scale = (hi - lo).clamp_min(1e-12) / 255
    zp = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def layer_sensitivity(model: nn.Module, predict_all: Any, data: Any, ref: torch.Tensor,
                      names: list[str]) -> list[tuple[float, str]]:
    """(logits SQNR with only this layer's input quantized, name) per layer, worst first.

    Global, not local: a layer whose own output error is large may barely move the logits
    (and the reverse), so each layer is judged by what it does to the model's output.
    """
    mods = dict(model.named_modules())
    out = []
    for n in names:
        h = mods[n].register_forward_pre_hook(lambda mod, args: (fake_quant_activation(args[0]),))
        try:
            out.append((sqnr_db(ref, predict_all(model, data)), n))
        finally:
            h.remove()
    return sorted(out)


def rank_layers(model: nn.Module, data: Any, eligible: Any = None) -> list[tuple[float, str]]:
    """Linear layers (those ``eligible(name)`` allows) ranked by :func:`layer_sensitivity`."""

    def run(m: nn.Module, d: Any) -> torch.Tensor:
        return _pa(torch_predict(m), d)

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (eligible is None or eligible(n))]
    return layer_sensitivity(model, run, data, run(model, data), names)
