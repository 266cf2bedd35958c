"""``train.lr: auto``: a short learning-rate range test (Smith, 2017; fastai's ``lr_find``).

On the run's own model (method applied), optimizer (:func:`slimtune.train.loop.make_optimizer`),
batches (:func:`slimtune.data.datasets.epoch_batches`), loss and precision, the rate grows
geometrically from ``START`` to ``END`` over at most ``STEPS`` optimizer steps (fewer when
``SECONDS`` run out or the loss explodes). The rate chosen is the one at the lowest smoothed loss
divided by 10 (fastai's "minimum / 10" rule: the minimum itself is already at the edge of
divergence). The trainable weights, and the RNG, are put back afterwards: training then starts
from the same weights as without the test. The curve goes into ``metrics.json`` (``lr_find``).
Method hooks (``on_step_end``: pruning masks, AdaLoRA budgets) are not called during the test.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from typing import Any

import torch

from slimtune.data.datasets import TokenizedData, collate, epoch_batches
from slimtune.methods import load_trainable_state, trainable_state
from slimtune.train.loop import autocast_ctx, default_loss, make_optimizer

START, END = 1e-6, 1.0
STEPS = 100
SECONDS = 120.0
SMOOTHING = 0.9  # EMA of the loss
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum


def lr_range_test(model: torch.nn.Module, data: TokenizedData, cfg: Any, device: torch.device, *,
                  steps: int = STEPS, seconds: float = SECONDS) -> dict[str, Any]:
    """Run the range test; return ``{"lr": chosen, "lrs": [...], "losses": [...], ...}``.

    Args:
        model: the model with the method applied (its trainable parameters are probed).
        data: the tokenized training data (batches of ``cfg.batch_size``, in the loop's order).
        cfg: the run's TrainConfig (weight decay, precision, clipping, seed; its lr is ignored).
        device: where the model is.
        steps: most optimizer steps (the rate spans START..END over them).
        seconds: wall-time bound of the whole test.
    """
    saved, rng, pyrng = trainable_state(model), torch.get_rng_state(), random.getstate()
    opt = make_optimizer(model, replace(cfg, lr=START))
    batches = epoch_batches(data.lengths(), cfg.batch_size, cfg.seed, 0)
    factor = (END / START) ** (1 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    smooth, best, t0 = None, math.inf, time.perf_counter()
    model.train()
    for i in range(steps):
        lr = START * factor ** i
        for g in opt.param_groups:
            g["lr"] = lr
        batch = {k: v.to(device) for k, v in collate(data, batches[i % len(batches)]).items()}
        with autocast_ctx(cfg.precision, device):
            loss = default_loss(model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        smooth = value if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * value
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if smooth > DIVERGED * best or time.perf_counter() - t0 > seconds:
            break
    load_trainable_state(model, saved)
    torch.set_rng_state(rng)
    random.setstate(pyrng)
    if not lrs:
        raise ValueError("train.lr=auto: the loss was not finite at the first step of the range test")
    at_min = lrs[losses.index(min(losses))]
    return {"lr": float(f"{at_min / 10:.3g}"), "lr_at_min_loss": at_min, "steps": len(lrs),
            "seconds": time.perf_counter() - t0, "lrs": lrs, "losses": losses,
            "rule": "lr at the minimum of the smoothed loss / 10"}
