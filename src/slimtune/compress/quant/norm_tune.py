"""Norm tuning: after weight-only quantization, retrain only the RMSNorm gains against the float model.

A 4-bit decoder's rounding error shifts what the last layers see; on a short-label task it shows
as a shifted decision (on the tuned SmolLM2, GPTQ Q4_0 alone moved Rotten Tomatoes answers toward
"rotten": exact match 0.83 -> 0.73 at only +5% answer perplexity). The norm gains are a few
thousand floats per model that GGUF stores as F32 beside the 4-bit codes, so tuning them costs
nothing at run time and leaves the codes (and llama.cpp's kernel) as they are. The loss is the
causal KD of :mod:`slimtune.compress.prune.decoder_kd` (the float model as teacher on the answer
positions, plus the task loss): the idea of Norm Tweaking (Li et al., 2023) with logit KD.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from torch import nn

from slimtune.compress.prune.decoder_kd import decoder_kd_loss_fn
from slimtune.data.datasets import TokenizedData, collate

DEFAULT_NORM_STEPS = 60
DEFAULT_NORM_LR = 1e-3
NORM_BATCH = 8


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, gain) of every norm module of the model (RMSNorm / LayerNorm weights)."""
    return [(n, p) for n, p in model.named_parameters() if "norm" in n.rsplit(".", 2)[-2].lower()]


def tune_norms(model: nn.Module, teacher: nn.Module, data: TokenizedData, steps: int = DEFAULT_NORM_STEPS,
               lr: float = DEFAULT_NORM_LR, seed: int = 0, log: Any = None) -> dict[str, Any]:
    """Train only ``model``'s norm gains for ``steps`` batches of ``data`` (KD from ``teacher``), in place.

    Args:
        model: the quantized causal LM (its other weights are frozen and left unchanged).
        teacher: the float model it was quantized from (same vocabulary).
        data: answer-masked chat examples (or text blocks: every token is a target).
        steps: optimizer steps of :data:`NORM_BATCH` examples (linear decay from ``lr``).
        lr: AdamW peak learning rate.
        seed: order of the examples.
        log: optional callable taking one progress line.

    Returns:
        ``{"steps", "lr", "trainable", "first_loss", "last_loss", "seconds"}``.
    """
    t0 = time.perf_counter()
    gains = norm_parameters(model)
    keep = {id(p) for _, p in gains}
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW([p for _, p in gains], lr=lr, weight_decay=0.0)
    loss_fn = decoder_kd_loss_fn(teacher, positions="answer")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for s in range(steps):
            start = (s * NORM_BATCH) % max(1, len(order) - NORM_BATCH + 1)
            for g in opt.param_groups:
                g["lr"] = lr * (1 - s / steps)
            loss = loss_fn(model, collate(data, order[start:start + NORM_BATCH]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None and (s % 10 == 0 or s == steps - 1):
                log(f"norm tuning step {s + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        model.train(was_training)
        for p, g in grads.items():
            p.requires_grad_(g)
    return {"steps": steps, "lr": lr, "batch_size": NORM_BATCH, "trainable": sum(p.numel() for _, p in gains),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}
