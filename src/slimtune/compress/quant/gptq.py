"""GPTQ rounding onto llama.cpp's Q4_0 grid: same file format and kernel, less error than rounding.

Q4_0 stores each run of 32 weights as one f16 scale ``d`` and 4-bit codes ``q`` in 0..15, the
weight being ``(q - 8) * d``; ``d`` is the block's signed largest-magnitude weight divided by -8
(so that weight is exact). llama.cpp's and ``gguf``'s quantizers round every weight to its
nearest code. GPTQ (Frantar et al., 2022) instead rounds the columns of a matrix one after
another and spreads each column's rounding error over the columns not rounded yet, weighted by
the inverse Hessian ``H = X^T X`` of the layer's inputs on calibration text, which minimises the
error of the layer's *output* rather than of its weights. Each block's scale is set from the
updated weights when the block's first column is reached, so the result is still plain Q4_0:
the same bytes llama.cpp's fast kernels read, smaller error.

Calibration is sequential, as in the paper: the decoder layers are processed in order, each
seeing the outputs of the already-quantized layers before it. The token embedding and output
projection are not touched (GGUF export keeps them at q8_0 under a 4-bit type).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

Q4_0_BLOCK = 32
DEFAULT_DAMP = 0.01


def q4_0_scales(w: torch.Tensor) -> torch.Tensor:
    """Q4_0 scales of ``w``'s 32-wide blocks (rows, blocks): signed max-magnitude / -8, rounded to f16."""
    b = w.reshape(w.shape[0], -1, Q4_0_BLOCK)
    idx = b.abs().argmax(dim=-1, keepdim=True)
    return (b.gather(-1, idx).squeeze(-1) / -8.0).to(torch.float16).to(torch.float32)


def q4_0_codes(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of ``w`` for scales ``d`` of the same shape: llama.cpp's rounding (x/d + 8.5, truncated)."""
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.clamp(torch.trunc(w * inv + 8.5), 0, 15)


def pack_q4_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """GGUF Q4_0 bytes (rows, blocks * 18) from codes (rows, n) and scales (rows, n / 32).

    A block is the f16 scale, then 16 bytes whose low nibbles are codes 0..15 of the block and
    high nibbles codes 16..31 (``gguf.quants.Q4_0``'s layout).
    """
    rows, n = codes.shape
    q = codes.to(torch.uint8).reshape(rows, n // Q4_0_BLOCK, Q4_0_BLOCK).numpy()
    qs = q[..., :16] | (q[..., 16:] << 4)
    d = scales.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def gptq_q4_0(w: torch.Tensor, h: torch.Tensor, damp: float = DEFAULT_DAMP,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one weight matrix onto the Q4_0 grid.

    Args:
        w: (out, in) float weight; ``in`` a multiple of 32.
        h: (in, in) sum of ``x^T x`` over the calibration inputs of this layer.
        damp: fraction of the mean diagonal added to ``h`` (numerical damping).
        block: columns per lazy-update batch (a multiple of 32).

    Returns:
        (dequantized weight, codes 0..15, scales (out, in / 32)); ``h`` = identity gives plain rounding (llama.cpp's Q4_0).
    """
    if w.shape[1] % Q4_0_BLOCK or block % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 needs rows of whole {Q4_0_BLOCK}-value blocks, got {tuple(w.shape)} / block {block}")
    W = w.detach().to(torch.float64).clone()
    H = h.detach().to(torch.float64).clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales = torch.zeros(W.shape[0], cols // Q4_0_BLOCK, dtype=torch.float64)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % Q4_0_BLOCK == 0:
                g = col // Q4_0_BLOCK
                scales[:, g] = q4_0_scales(W1[:, i:i + Q4_0_BLOCK].float()).squeeze(1).double()
            d = scales[:, col // Q4_0_BLOCK]
            c = q4_0_codes(W1[:, i], d)
            q = (c - 8.0) * d
            codes[:, col], Q[:, col] = c, q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.float(), codes.to(torch.uint8), scales.float()


# ------------------------------------------------------------------------------------------------
# the model: layer by layer on calibration sequences
# ------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, seqs: Sequence[Sequence[int]]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first decoder layer for each calibration sequence (batch 1, no padding)."""
    layers = model.model.layers
    first = layers[0]
    captured: list[tuple[tuple, dict]] = []

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in seqs:
            try:
                model(input_ids=torch.tensor([list(ids)]), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def gptq_quantize_decoder(model: nn.Module, seqs: Sequence[Sequence[int]], damp: float = DEFAULT_DAMP,
                          log: Any = None) -> dict[str, Any]:
    """GPTQ every linear of every decoder layer of a Llama-style causal LM onto Q4_0, in place.

    The model's weights become the dequantized Q4_0 values (so torch evaluates what llama.cpp
    will run); the exact codes and scales are returned for :func:`pack_q4_0`.

    Args:
        model: a ``LlamaForCausalLM``-shaped model (``model.model.layers``), float32, eval mode.
        seqs: calibration token id sequences (whole chat rows: prompt and answer).
        damp: Hessian damping (fraction of its mean diagonal).
        log: optional callable taking one progress line.

    Returns:
        ``{"codes": {hf weight name: (codes, scales)}, "layers": n, "tokens": n, "seconds": s,
        "output_error": {name: relative output error of plain rounding vs GPTQ}}``.
    """
    t0 = time.perf_counter()
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad():
        inputs = _layer_inputs(model, seqs)
        hidden = [a[0] for a, _ in inputs]
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        errors: dict[str, list[float]] = {}
        for li, layer in enumerate(model.model.layers):
            linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
            H, xs = _input_stats(layer, linears, hidden, [kw for _, kw in inputs])
            for m in linears:
                w = m.weight.data
                q, codes, scales = gptq_q4_0(w, H[m], damp=damp)
                x = torch.cat(xs[m])
                ref = x @ w.T
                rtn = _rtn(w)
                errors[names[m]] = [float((x @ rtn.T - ref).norm() / ref.norm()), float((x @ q.T - ref).norm() / ref.norm())]
                m.weight.data = q.to(w.dtype)
                out[names[m] + ".weight"] = (codes, scales)
            hidden = [_first(layer(h, **kw)) for h, (_, kw) in zip(hidden, inputs, strict=True)]
            if log is not None:
                e = np.mean([errors[names[m]] for m in linears], axis=0)
                log(f"gptq layer {li}: output error round-to-nearest {e[0]:.4f} -> GPTQ {e[1]:.4f}")
    tokens = sum(len(s) for s in seqs)
    return {"codes": out, "layers": len(model.model.layers), "tokens": tokens, "sequences": len(seqs),
            "seconds": round(time.perf_counter() - t0, 1), "output_error": errors}


def _input_stats(layer: nn.Module, linears: list[nn.Linear], hidden: list[torch.Tensor],
                 kwargs: list[dict]) -> tuple[dict[nn.Module, torch.Tensor], dict[nn.Module, list[torch.Tensor]]]:
    """Per linear of ``layer``: ``sum x^T x`` over its inputs on every sequence, and a few inputs (for errors)."""
    H = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in linears}
    xs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in linears}

    def acc(mod: nn.Module, args: tuple, _out: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        H[mod] += x.to(torch.float64).T @ x.to(torch.float64)
        if len(xs[mod]) < 4:
            xs[mod].append(x)

    hooks = [m.register_forward_hook(acc) for m in linears]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            layer(h, **kw)
    finally:
        for hk in hooks:
            hk.remove()
    return H, xs


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _rtn(w: torch.Tensor) -> torch.Tensor:
    """Plain Q4_0 round-to-nearest of ``w`` (dequantized)."""
    rows, n = w.shape
    d = q4_0_scales(w)[..., None]
    c = q4_0_codes(w.reshape(rows, n // Q4_0_BLOCK, Q4_0_BLOCK), d)
    return ((c - 8.0) * d).reshape(rows, n)
