"""Calibration passes for decoder pruning: a few batches of task tokens through the model, with hooks.

Layer importance (block influence) and width importance (activations of the FFN and attention
outputs) are statistics over real tokens of the training data: :func:`calibration_batches`
draws a seeded sample of examples, and :func:`forward_with_hooks` runs them in eval mode with
forward hooks that receive the token mask of the batch, so padding never counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimtune.compress.prune.decoder_arch import DecoderPruneError
from slimtune.data.datasets import TokenizedData, collate, epoch_batches

Hook = Callable[[torch.nn.Module, torch.Tensor, Any, torch.Tensor], None]
"""``hook(module, x, output, mask)``: ``x`` is the module's (first) input, ``mask`` the (B, T)
bool tensor of the batch's real tokens."""


def calibration_batches(data: TokenizedData, num_batches: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``num_batches`` seeded batches of ``data`` (input ids, attention mask, labels)."""
    order = epoch_batches(data.lengths(), batch_size, seed, 0)[:num_batches]
    if not order:
        raise DecoderPruneError("decoder importance needs calibration data; the training data is empty")
    return [collate(data, idx) for idx in order]


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) bool: the real (non-padding) tokens of a collated batch."""
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def forward_with_hooks(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                       hooks: list[tuple[torch.nn.Module, Hook]], *, grad: bool = False,
                       on_loss: Callable[[torch.Tensor], None] | None = None) -> None:
    """Run ``batches`` through ``model`` (eval mode, no KV cache) calling each hook on its module.

    Args:
        model: The causal LM.
        batches: Collated batches (labels are used only with ``grad``).
        hooks: ``(module, hook)`` pairs; the hook sees the batch's token mask.
        grad: Run with autograd and call ``on_loss(loss)`` per batch (Taylor importance).
        on_loss: What to do with each batch's loss (typically ``backward``).
    """
    device = next(model.parameters()).device
    current: dict[str, torch.Tensor] = {}
    def wrap(h: Hook) -> Callable[..., None]:
        def call(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            h(mod, x, out, current["mask"])
        return call

    handles = [m.register_forward_hook(wrap(h), with_kwargs=True) for m, h in hooks]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            current["mask"] = token_mask(batch)
            if not grad:
                batch.pop("labels", None)
            ctx = torch.enable_grad() if grad else torch.inference_mode()
            with ctx:
                out = model(**batch, use_cache=False)
                if grad and on_loss is not None:
                    on_loss(out.loss)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
