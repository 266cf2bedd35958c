"""Weight-only int8 / int4 ``nn.Linear`` on torch's CPU kernels, for decoders at batch size 1.

:func:`to_kernels` swaps every :class:`~slimtune.compress.quant.api.QuantizedLinear` whose codes a
kernel can run for a module that computes with the codes directly instead of decoding the float
weight on every call:

- int8, per-channel symmetric -> :class:`Int8KernelLinear` (``torch._weight_int8pack_mm``);
- int4, group-wise (32, 64, 128 or 256) -> :class:`Int4KernelLinear`
  (``torch._weight_int4pack_mm_for_cpu``; codes repacked at load, scales and zero points folded
  into the kernel's ``(q - 8) * scale + zero`` form).

Both compute exactly ``x @ dequantized(W).T + b`` up to float rounding (tests compare them with
:meth:`QuantizedLinear.to_float`). Whether they are *faster* than fp32 depends on the CPU:
``slimtune quantize`` on a decoder measures them beside llama.cpp and keeps the fastest.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.compress.quant.api import QuantizedLinear, _set_module
from slimtune.compress.quant.linear import qrange, unpack_bits

INT4_GROUPS = (32, 64, 128, 256)


class Int8KernelLinear(nn.Module):
    """``y = x @ (q * s).T + b`` with int8 codes ``q`` (out, in) and one scale per output row."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).float(), self.qweight, self.scale)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y


class Int4KernelLinear(nn.Module):
    """Group-wise int4 ``nn.Linear`` on ``torch._weight_int4pack_mm_for_cpu``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        """``codes``: (out, in) integers 0..15; ``scale``/``zero``: (out, in / group_size), so that
        the weight is ``(codes - 8) * scale + zero`` group by group."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale.float(), zero.float()], -1).transpose(0, 1).contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).float(), self.packed,
                                              self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y


def kernel_for(m: QuantizedLinear) -> nn.Module | None:
    """The kernel module computing what ``m`` computes, or None when no kernel runs its codes."""
    meta, t = m.qmeta, m.qtensors()
    if meta.get("kind") != "affine":
        return None
    out, inp = meta["shape"]
    if meta["bits"] == 8 and meta["granularity"] == "channel" and meta["symmetric"]:
        return Int8KernelLinear(t["qdata"].reshape(out, inp), t["scale"], m.bias)
    gs = meta.get("group_size")
    if meta["bits"] == 4 and meta["granularity"] == "group" and gs in INT4_GROUPS and inp % gs == 0:
        q = unpack_bits(t["qdata"], 4, out * inp).to(torch.int16) + qrange(4)[0]  # signed -8..7
        scale = t["scale"].float().reshape(out, inp // gs)
        zp = t["zero_point"].float().reshape(out, inp // gs) if "zero_point" in t else torch.zeros_like(scale)
        # (q - zp) * s  ==  ((q + 8) - 8) * s + (-zp * s)
        return Int4KernelLinear((q + 8).reshape(out, inp), scale, -zp * scale, gs, m.bias)
    return None


def to_kernels(model: nn.Module) -> dict[str, str]:
    """Swap every kernel-runnable QuantizedLinear in place; return ``{module: kernel class}``."""
    swapped: dict[str, str] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            k = kernel_for(m)
            if k is not None:
                _set_module(model, name, k)
                swapped[name] = type(k).__name__
    return swapped
