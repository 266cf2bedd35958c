"""Recovery loss of a pruned decoder: causal logit KD from the unpruned model plus the task loss.

``loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``
through :func:`slimtune.compress.distill.losses.kd_loss` (Hinton et al. 2015; the causal form
of ``slimtune distill``): position t predicts token t+1, so the last position is dropped, and
the KL is averaged over the positions ``positions`` selects:

- ``answer`` (default): only where the task loss is (the answer tokens of chat data, as SFT
  trains; every real token of raw text);
- ``all``: every position whose next token is real (not padding): the teacher's next-token
  distribution over the prompt too. Measured on SmolLM2 (30 -> 24 layers, 40 recovery steps,
  Rotten Tomatoes chat data), ``all`` left the model answering one label (dev exact match 0.33)
  while ``answer`` recovered it (0.75; unpruned 0.77): with few steps, the prompt positions'
  many terms drown the task's two.

The CE term is the model's own loss on the batch's labels (answer tokens only for chat data).
With a pruned vocabulary the student sees new ids: the teacher is fed the old ids
(``new_to_old[ids]``) and its logits are read at the kept ids, so both distributions are over
the same (kept) tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from slimtune.compress.distill.losses import causal_kd_mask, kd_loss

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def kd_mask(batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """(B, T-1) bool: the positions whose KD term counts (see the module docstring)."""
    if positions == "answer":
        return causal_kd_mask(batch["labels"])
    if "attention_mask" in batch:
        return batch["attention_mask"][:, 1:].bool()
    return torch.ones_like(batch["input_ids"][:, 1:], dtype=torch.bool)


def decoder_kd_loss_fn(teacher: torch.nn.Module, new_to_old: torch.Tensor | None = None, *, temperature: float = 2.0,
                       alpha: float = 0.5, positions: str = "answer") -> LossFn:
    """``loss_fn(model, batch)`` for :func:`slimtune.train.loop.train` (``alpha`` weighs the KD term).

    Args:
        teacher: The unpruned causal LM (frozen here: eval mode, no gradients).
        new_to_old: (V_student,) old id of each kept token when the vocabulary was pruned.
        temperature: Softmax temperature of the KD term.
        alpha: Weight of the KD term (``1 - alpha`` on the task cross-entropy).
        positions: ``answer`` or ``all`` (see :func:`kd_mask`).
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch, use_cache=False)
        tbatch = {k: v for k, v in batch.items() if k != "labels"}
        index = None
        if new_to_old is not None:
            index = new_to_old.to(batch["input_ids"].device)
            tbatch["input_ids"] = index[batch["input_ids"]]
        with torch.no_grad():
            t_logits = teacher(**tbatch, use_cache=False).logits
            if index is not None:
                t_logits = t_logits.index_select(-1, index)
        mask = kd_mask(batch, positions)
        return kd_loss(out.logits[:, :-1], t_logits[:, :-1].float(), out.loss, alpha=1.0 - alpha,
                       temperature=temperature, mask=mask)

    return loss_fn


def task_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The model's own loss on the batch's labels, without a KV cache (recovery without KD)."""
    return model(**batch, use_cache=False).loss
