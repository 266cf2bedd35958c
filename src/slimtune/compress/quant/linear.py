"""Linear (affine) quantization of a weight matrix: int8 / int4, symmetric or asymmetric,
per-tensor, per-channel (per row) or group-wise, and exact bit packing.

A weight ``W`` of shape (rows, cols) is cut into *blocks*, each with its own scale (and zero
point): one block for ``tensor``, one per row for ``channel`` (a row is an output channel of a
Linear, or one token of an Embedding), ``cols / group_size`` per row for ``group``. Codes
``q`` are integers in ``[qmin, qmax]``; ``W ≈ (q - zero_point) * scale``.

Conventions follow torchao's ``choose_qparams_affine``: symmetric uses the full signed range
(``scale = amax / ((qmax - qmin) / 2)``, zero point 0); asymmetric maps ``[min(w, 0), max(w, 0)]``
onto ``[qmin, qmax]`` so 0.0 stays exactly representable (padding rows, pruned weights).
"""

from __future__ import annotations

from typing import Any

import torch

GRANULARITIES = ("tensor", "channel", "group")


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range for ``bits``: int8 -> (-128, 127), int4 -> (-8, 7)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def to_blocks(w: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View a 2-D weight as (n_blocks, block_len); every row of the result shares one scale."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "channel":
        return w
    if granularity == "group":
        if cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide the {cols} input columns")
        return w.reshape(rows * (cols // group_size), group_size)
    raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")


def choose_qparams(blocks: torch.Tensor, bits: int, symmetric: bool,
                   scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (n_blocks,) in ``scale_dtype`` and int8 zero point (n_blocks,) or None (symmetric).

    The scale is rounded to its storage dtype *before* codes are computed, so what is saved is
    exactly what was used: a reload reproduces the weights bit for bit.
    """
    qmin, qmax = qrange(bits)
    x = blocks.float()
    eps = torch.finfo(torch.float16).tiny if scale_dtype == torch.float16 else 1e-12
    if symmetric:
        amax = x.abs().amax(dim=1)
        scale = (amax / ((qmax - qmin) / 2)).clamp_min(eps).to(scale_dtype)
        return scale, None
    lo = x.amin(dim=1).clamp_max(0)
    hi = x.amax(dim=1).clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps).to(scale_dtype)
    zp = (qmin - torch.round(lo / scale.float())).clamp(qmin, qmax).to(torch.int8)
    return scale, zp


def quantize_blocks(blocks: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes (int8 tensor, same shape as ``blocks``) for the given qparams."""
    qmin, qmax = qrange(bits)
    q = torch.round(blocks.float() / scale.float()[:, None])
    if zp is not None:
        q = q + zp.float()[:, None]
    return q.clamp(qmin, qmax).to(torch.int8)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None) -> torch.Tensor:
    """Float32 blocks ``(q - zp) * scale``."""
    x = q.float()
    if zp is not None:
        x = x - zp.float()[:, None]
    return x * scale.float()[:, None]


# --------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in ``[0, 2**bits)`` into a flat uint8 tensor, ``8 / bits`` per byte.

    4-bit: two codes per byte, the first in the high nibble. Other widths (1-7) use a plain
    MSB-first bit stream. The caller keeps the element count to unpack.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return (flat[0::2] << 4) | flat[1::2]
    if not 1 <= bits <= 7:
        raise ValueError(f"cannot pack {bits}-bit codes")
    # Generic: (n, bits) bit matrix, MSB first, then 8 bits per byte.
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8)
    bitmat = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitmat.numel()) % 8
    if pad:
        bitmat = torch.cat([bitmat, bitmat.new_zeros(pad)])
    weights = (1 << torch.arange(7, -1, -1, dtype=torch.int32)).to(torch.uint8)
    return (bitmat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat uint8 tensor."""
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:numel].clone()
    if bits == 4:
        out = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
        return out[:numel]
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bitmat = ((packed[:, None] >> shifts) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    weights = (1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32))
    return (bitmat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Whole-tensor encode / decode (what modules and files hold)
# --------------------------------------------------------------------------------------------


def encode_affine(w: torch.Tensor, *, bits: int, symmetric: bool, granularity: str, group_size: int,
                  scale_dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Quantize a 2-D weight; return (meta, tensors) ready for safetensors + JSON.

    tensors: ``qdata`` (int8 codes for 8 bits; packed uint8, two per byte, for 4 bits),
    ``scale`` (n_blocks,), and ``zero_point`` (n_blocks,) int8 when asymmetric.
    """
    if bits not in (4, 8):
        raise ValueError(f"linear quantization supports 4 or 8 bits, got {bits}")
    blocks = to_blocks(w.detach(), granularity, group_size)
    scale, zp = choose_qparams(blocks, bits, symmetric, scale_dtype)
    q = quantize_blocks(blocks, scale, zp, bits)
    qmin, _ = qrange(bits)
    qdata = q.reshape(w.shape).contiguous() if bits == 8 else pack_bits((q.to(torch.int16) - qmin).to(torch.uint8), 4)
    tensors = {"qdata": qdata, "scale": scale.contiguous()}
    if zp is not None:
        tensors["zero_point"] = zp.contiguous()
    meta = {"kind": "affine", "bits": bits, "symmetric": symmetric, "granularity": granularity,
            "group_size": group_size if granularity == "group" else None, "shape": list(w.shape),
            "dtype": str(w.dtype).removeprefix("torch.")}
    return meta, tensors


def decode_affine(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float weight of the original shape and dtype from :func:`encode_affine`'s output."""
    shape, bits = tuple(meta["shape"]), meta["bits"]
    numel = shape[0] * shape[1]
    if bits == 8:
        q = tensors["qdata"].reshape(shape)
    else:
        q = (unpack_bits(tensors["qdata"], 4, numel).to(torch.int16) + qrange(4)[0]).to(torch.int8).reshape(shape)
    blocks = to_blocks(q, meta["granularity"], meta.get("group_size") or 0)
    w = dequantize_blocks(blocks, tensors["scale"], tensors.get("zero_point"))
    return w.reshape(shape).to(getattr(torch, meta.get("dtype", "float32")))


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, ``20 log10(||ref|| / ||ref - approx||)``
    (torchao's ``compute_error``). Identical tensors give +inf."""
    ref, approx = ref.detach().float(), approx.detach().float()
    noise = torch.linalg.vector_norm(ref - approx)
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(torch.linalg.vector_norm(ref) / noise))
