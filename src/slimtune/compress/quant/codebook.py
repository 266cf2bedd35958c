"""Non-linear (codebook) quantization: NF4 and k-means.

Both store small integer *codes* plus a table of float values the codes index:

- **NF4** (Dettmers et al., 2023, QLoRA): a fixed 16-value table whose entries are quantiles of
  a standard normal, rescaled to [-1, 1], with an exact zero. Each block of ``block_size``
  consecutive weights is divided by its absmax, then every value takes the nearest entry.
  Stored: 4-bit codes (two per byte) + one float32 absmax per block.
- **k-means**: ``2**bits`` centroids learned by 1-D Lloyd iterations, one codebook for the
  whole tensor or one per row (channel). Stored: bit-packed codes + the codebook(s).
"""

from __future__ import annotations

from typing import Any

import torch

from slimtune.compress.quant.linear import pack_bits, unpack_bits

# The NF4 table from bitsandbytes / the QLoRA paper (appendix E): 8 positive quantiles of
# N(0, 1) and 7 negative ones, normalised to [-1, 1], plus an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted ``table`` for every value of ``x``.

    x: (R, N); table: (R, K) sorted ascending (or (K,), shared). Uses the midpoints between
    neighbouring entries as bucket edges: O(N log K) and no (N, K) distance matrix.
    """
    if table.ndim == 1:
        table = table[None].expand(x.shape[0], -1)
    mids = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()  # (R, K-1)
    return torch.searchsorted(mids, x.contiguous()).to(torch.uint8)


def encode_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """NF4-quantize any tensor whose element count is a multiple of ``block_size``."""
    flat = w.detach().float().reshape(-1)
    if flat.numel() % block_size:
        raise ValueError(f"NF4 block_size {block_size} does not divide {flat.numel()} elements")
    blocks = flat.reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    codes = nearest_code(blocks / absmax[:, None], NF4_CODE)
    meta = {"kind": "nf4", "bits": 4, "block_size": block_size, "shape": list(w.shape),
            "dtype": str(w.dtype).removeprefix("torch.")}
    return meta, {"qdata": pack_bits(codes, 4), "absmax": absmax.contiguous()}


def decode_nf4(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float weight from :func:`encode_nf4`'s output."""
    shape = tuple(meta["shape"])
    numel = int(torch.tensor(shape).prod()) if shape else 1
    codes = unpack_bits(tensors["qdata"], 4, numel).long().reshape(-1, meta["block_size"])
    w = NF4_CODE[codes] * tensors["absmax"].float()[:, None]
    return w.reshape(shape).to(getattr(torch, meta.get("dtype", "float32")))


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 1-D k-means: x (R, N) -> (centroids (R, k) sorted, codes (R, N) uint8).

    Initialised at the quantiles of each row (a good start for bell-shaped weights), then Lloyd
    iterations; an empty cluster keeps its previous centroid.
    """
    x = x.float()
    R, N = x.shape
    probs = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    # torch.quantile refuses > 16M elements; a strided subsample gives the same start.
    sample = x if N <= 1_000_000 else x[:, :: (N // 1_000_000) + 1]
    cent = torch.quantile(sample, probs, dim=1).T.contiguous()  # (R, k)
    codes = nearest_code(x, cent)
    for _ in range(iters):
        idx = codes.long()
        sums = torch.zeros(R, k).scatter_add_(1, idx, x)
        counts = torch.zeros(R, k).scatter_add_(1, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
        new, _ = new.sort(dim=1)
        new_codes = nearest_code(x, new)
        done = torch.equal(new_codes, codes)
        cent, codes = new, new_codes
        if done:
            break
    return cent, codes


def encode_kmeans(w: torch.Tensor, bits: int = 4, granularity: str = "channel",
                  iters: int = 25) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """k-means codebook quantization of a 2-D weight, per ``tensor`` or per ``channel`` (row)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"k-means bits must be in 1..8, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if granularity == "tensor":
        rows = w.detach().reshape(1, -1)
    elif granularity == "channel":
        rows = w.detach()
    else:
        raise ValueError(f"k-means granularity must be tensor or channel, got {granularity!r}")
    cent, _ = kmeans_1d(rows, 2 ** bits, iters)
    # Stored in float16 (a per-row codebook is 2**bits values per row: halves its overhead);
    # codes are re-assigned against the rounded values, so the file is exactly what was used.
    cent = cent.half()
    codes = nearest_code(rows.float(), cent.float())
    meta = {"kind": "kmeans", "bits": bits, "granularity": granularity, "shape": list(w.shape),
            "dtype": str(w.dtype).removeprefix("torch.")}
    return meta, {"qdata": pack_bits(codes, bits), "codebook": cent.contiguous()}


def decode_kmeans(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float weight from :func:`encode_kmeans`'s output."""
    shape = tuple(meta["shape"])
    book = tensors["codebook"].float()  # (R, k)
    codes = unpack_bits(tensors["qdata"], meta["bits"], shape[0] * shape[1]).long().reshape(book.shape[0], -1)
    return torch.gather(book, 1, codes).reshape(shape).to(getattr(torch, meta.get("dtype", "float32")))
