"""The SFT loss: next-token cross-entropy on the answer tokens, with logits only where a label is.

Chat/instruction examples (:mod:`slimtune.data.chat`) train on their answers only: every other
label is -100. A causal LM's own loss still projects EVERY position through the LM head, a
``(batch, length, vocab)`` tensor (SmolLM2: 49,152 logits a token, 200 MB in float32 for 8 x 128
tokens, as much again for its log-softmax and for its gradient), then discards the prompt
positions. For a one-word answer after a 90-token prompt that is ~95% of the head's work and
memory thrown away.

:func:`sft_loss` asks the model for the logits of the positions that predict a trained token and
no others, through transformers' ``logits_to_keep``:

- a boolean ``(batch, length)`` mask, exactly the positions ``p`` whose next label
  ``labels[b, p + 1]`` is not -100, where the model slices with transformers'
  ``slice_logits_to_keep`` (every model of transformers 5);
- else a 1-D tensor of positions (the union of those positions over the batch's rows; a row's
  target at a position it does not train is -100), which older models take;
- a model whose ``forward`` has no ``logits_to_keep`` gets its own loss.

The cross-entropy over the kept logits is the mean NLL over exactly the answer tokens: the
model's own loss, computed on less (``tests/test_sft_loss.py`` checks loss and gradients against
``model(**batch).loss``). The call goes through the model itself (PEFT, DDP and FSDP wrappers pass
``logits_to_keep`` on), so hooks and gradient synchronisation are untouched.

:func:`sft_eval_loss` is the evaluation twin (answer perplexity during and around training):
:func:`slimtune.evaluate.metrics.evaluate_causal_lm`'s figures, from the answer positions' logits only.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from slimtune.data.datasets import TokenizedData, collate, epoch_batches
from slimtune.evaluate.metrics import evaluate_causal_lm

_MODES: dict[type, str] = {}


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP (``.module``) and PEFT (``get_base_model()``) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def keep_mode(model: torch.nn.Module) -> str:
    """How the (unwrapped) model takes ``logits_to_keep``: ``mask`` (a boolean (B, T) mask),
    ``positions`` (a 1-D tensor of positions) or ``none`` (not at all)."""
    cls = type(_hf_model(model))
    if cls not in _MODES:
        try:
            takes = "logits_to_keep" in inspect.signature(cls.forward).parameters
        except (TypeError, ValueError):
            takes = False
        sliced = hasattr(sys.modules.get(cls.__module__), "slice_logits_to_keep")
        _MODES[cls] = "none" if not takes else ("mask" if sliced else "positions")
    return _MODES[cls]


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position ``p`` predicts a trained token (``labels[:, p + 1] != -100``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   mode: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits (N, V), targets (N,)) of the answer positions; None when the batch trains no token."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = answer_mask(labels)
    if not bool(mask.any()):
        return None
    if mode == "mask":
        logits = model(**inputs, logits_to_keep=mask).logits  # (N, V): the trained positions, row-major
        targets = labels[:, 1:][mask[:, :-1]]
    else:
        keep = mask.any(dim=0).nonzero().flatten()
        logits = model(**inputs, logits_to_keep=keep).logits  # (B, K, V)
        targets = labels[:, keep + 1]  # -100 where that row trains nothing at the position
    return logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the tokens whose label is not -100; logits for those positions only.

    Equal to ``model(**batch).loss`` (the shifted cross-entropy, mean over the trained tokens).
    """
    labels = batch.get("labels")
    mode = keep_mode(model)
    if labels is None or labels.dim() != 2 or mode == "none":
        return model(**batch).loss
    got = _answer_logits(model, batch, mode)
    if got is None:  # nothing trained in this batch: a zero that still reaches every weight
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs, logits_to_keep=1).logits.sum() * 0.0
    return F.cross_entropy(*got, ignore_index=-100)


def sft_eval_loss(model: torch.nn.Module, data: TokenizedData, batch_size: int = 8) -> dict[str, Any]:
    """Mean NLL over the answer tokens of ``data`` and its perplexity (``{"loss", "perplexity",
    "tokens"}``, as :func:`slimtune.evaluate.metrics.evaluate_causal_lm`), from the answer positions'
    logits only: batches sorted by length, inference mode."""
    mode = keep_mode(model)
    if mode == "none" or data.token_labels is None:
        return evaluate_causal_lm(model, data, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False, group_by_length=True):
            got = _answer_logits(model, {k: v.to(device) for k, v in collate(data, idx).items()}, mode)
            if got is not None:
                nll += F.cross_entropy(*got, ignore_index=-100, reduction="sum").item()
                tokens += int((got[1] != -100).sum())
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
