"""The torch decoder backend of ``slimtune serve``: many sequences in one left-padded KV cache.

:class:`TorchDecoder` implements :class:`slimtune.serve.lm_backend.DecoderBackend` for any
transformers causal LM slimtune loads. All live sequences sit in one batch: a KV cache
(transformers' ``DynamicCache``) with one row per sequence, left-padded to the longest, an
attention mask marking the padding, and each row's own position ids (real tokens only, as
:func:`slimtune.runtime.generate.generate_ids` does for its left-padded batches). So

- ``decode`` is one forward pass of shape (sequences, 1) through the shared cache;
- ``prefill`` runs the new prompts as their own left-padded batch, then joins their cache rows
  to the running batch (both sides padded on the left to the same length);
- ``release`` selects the remaining rows and cuts the columns that have become padding in every
  row, so a long answer that ended leaves no cost behind.

Joining and cutting copy the cache, but only when a sequence starts or ends, never per token.
Models whose cache is not plain full-attention ``DynamicCache`` layers (sliding windows,
hybrid caches) cannot be joined this way: they get ``max_batch = 1`` (one sequence at a time).
The forward passes themselves go through :func:`slimtune.runtime.generate.forward_last`, the
same call ``generate_ids`` makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from slimtune.models.loading import ModelError
from slimtune.runtime.generate import eos_ids, forward_last
from slimtune.serve.lm_backend import DecoderBackend


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` zero-padded on the left of dimension ``dim`` (-1 or -2) to ``length``."""
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    return F.pad(x, (extra, 0) if dim == -1 else (0, 0, extra, 0))


def _joinable(cache: Any) -> bool:
    """Whether ``cache`` is full-attention ``DynamicCache`` layers holding (B, H, T, D) tensors."""
    layers = getattr(cache, "layers", None)
    return (isinstance(cache, DynamicCache) and bool(layers)
            and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                    and layer.keys.dim() == 4 for layer in layers))


class TorchDecoder(DecoderBackend):
    """A transformers causal LM serving many sequences from one batched KV cache (module docstring)."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", context_length: int | None = None):
        """Wrap ``model`` (already on ``device``, eval mode) and probe whether its cache can be batched.

        Raises:
            ModelError: the model returns no KV cache (it could only be served by recomputing
                every sequence at every token).
        """
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        self.eos_ids = frozenset(eos_ids(model, tokenizer))
        n_pos = getattr(model.config, "max_position_embeddings", None)
        self.context_length = int(context_length or n_pos or 2048)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self._reset()
        with torch.inference_mode():  # also the first call that allocates and picks kernels
            probe = torch.tensor([[self.pad_id]], device=device)
            _, cache = forward_last(model, probe, None, torch.zeros_like(probe))
        if cache is None:
            raise ModelError("this model returns no KV cache; slimtune serve needs one to generate")
        self.max_batch = 1_000_000 if _joinable(cache) else 1

    def _reset(self) -> None:
        self.rows: list[int] = []  # seq id of each cache row
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 = real token, 0 = left padding
        self.next_pos: torch.Tensor | None = None  # (B, 1) position of each row's next token
        self.padded = False

    def held(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def prefill(self, seqs: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        if not seqs or any(len(p) == 0 for _, p in seqs):
            raise ValueError("prefill needs at least one non-empty prompt")
        if self.rows and self.max_batch == 1 or len(seqs) > self.max_batch:
            raise ValueError("this model's cache holds one sequence at a time")
        n, L = len(seqs), max(len(p) for _, p in seqs)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        for b, (_, p) in enumerate(seqs):
            ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[b, L - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, cache = forward_last(self.model, ids, mask if padded else None, positions)
        self._join([s for s, _ in seqs], cache, mask, positions[:, -1:] + 1)
        return logits.float()

    def _join(self, seq_ids: list[int], cache: Any, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Add new rows (their own cache, mask and next positions) below the running batch."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_pos = list(seq_ids), cache, mask, next_pos
            self.padded = bool((mask == 0).any())
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.rows += seq_ids
        self.padded = bool((self.mask == 0).any())

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        if sorted(seq_ids) != sorted(self.rows):
            raise ValueError("decode steps every held sequence, exactly once")
        order = {s: i for i, s in enumerate(seq_ids)}
        col = torch.tensor([tokens[order[s]] for s in self.rows], dtype=torch.long, device=self.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache = forward_last(self.model, col, self.mask if self.padded else None, self.next_pos,
                                          self.cache)
        self.next_pos = self.next_pos + 1
        back = torch.tensor([self.rows.index(s) for s in seq_ids], device=logits.device)
        return logits.float().index_select(0, back)

    def release(self, seq_ids: Sequence[int]) -> None:
        gone = set(seq_ids)
        keep = [i for i, s in enumerate(self.rows) if s not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        self.rows = [self.rows[i] for i in keep]
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns before it are padding in every row
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]
        self.padded = bool((self.mask == 0).any())


__all__ = ["TorchDecoder"]
