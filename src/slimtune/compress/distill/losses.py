"""Distillation losses: soft-label KL on logits, hidden-state MSE and attention-map KL.

Logit KD (Hinton et al., 2015)::

    loss = α · CE(student, hard labels) + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T))

The T² factor keeps the soft term's gradient scale independent of T (the gradient of the
tempered KL shrinks as 1/T²). ``direction="reverse"`` uses KL(student ‖ teacher) instead
(mode-seeking; MiniLLM, Gu et al. 2023), useful for causal LMs. ``logit_loss="mse"`` replaces
the KL with the mean squared error between raw logits (Kim et al., 2021: the limit of the T²-KL
as T → ∞, up to a constant; TextBrewer's ``kd_loss_type="mse"``).

Intermediate KD (TinyBERT, Jiao et al. 2020; PKD, Sun et al. 2019): MSE between matched
hidden states, through a learned linear projection when the widths differ, and KL between
matched attention distributions (MiniLM-style, Wang et al. 2020), head by head when the head
counts agree, else on the head-averaged maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Direction = Literal["forward", "reverse"]
LogitLoss = Literal["kl", "mse"]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None, direction: Direction = "forward") -> torch.Tensor:
    """T²-scaled KL between tempered softmaxes, averaged over rows (masked rows excluded).

    Args:
        student_logits: (..., C) raw logits of the student.
        teacher_logits: (..., C) raw logits of the teacher (no gradient needed).
        temperature: softmax temperature T (> 0).
        mask: optional boolean (...) tensor; rows where it is False carry no loss
            (padding, or the last position of a causal block).
        direction: "forward" = KL(teacher ‖ student), "reverse" = KL(student ‖ teacher).

    Returns:
        Scalar ``T² · mean_rows KL``.
    """
    _check_same_shape(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, C) / temperature, dim=-1)  # (N, C)
    t = F.log_softmax(teacher_logits.float().reshape(-1, C) / temperature, dim=-1)  # (N, C)
    if direction == "forward":
        per_row = (t.exp() * (t - s)).sum(-1)  # KL(p_t ‖ p_s), (N,)
    elif direction == "reverse":
        per_row = (s.exp() * (s - t)).sum(-1)  # KL(p_s ‖ p_t), (N,)
    else:
        raise ValueError(f"KL direction {direction!r} is not 'forward' or 'reverse'")
    return _row_mean(per_row, mask) * (temperature ** 2)


def _check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the vocabularies/label sets must match")


def _row_mean(per_row: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) per-row losses over the rows ``mask`` (any shape with N elements) keeps."""
    if mask is None:
        return per_row.mean()
    m = mask.reshape(-1).to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp_min(1.0)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between raw logits, averaged over classes and rows (masked rows excluded).

    Args:
        student_logits: (..., C) raw logits of the student.
        teacher_logits: (..., C) raw logits of the teacher.
        mask: optional boolean (...) tensor; rows where it is False carry no loss.

    Returns:
        Scalar ``mean_rows mean_classes (s − t)²``.
    """
    _check_same_shape(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    per_row = ((student_logits.float() - teacher_logits.float()) ** 2).reshape(-1, C).mean(-1)  # (N,)
    return _row_mean(per_row, mask)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor | None,
            alpha: float, temperature: float, mask: torch.Tensor | None = None,
            direction: Direction = "forward", logit_loss: LogitLoss = "kl") -> torch.Tensor:
    """``α · hard_loss + (1 − α) · soft``; α = 1 is plain fine-tuning (the teacher is unused).

    Args:
        student_logits, teacher_logits: (..., C) logits over the same classes / vocabulary.
        hard_loss: cross-entropy on the hard labels (the model's own loss); None means α must be 0.
        alpha: weight of the hard-label term in [0, 1].
        temperature: softmax temperature of the soft term (KL only).
        mask: rows that count in the soft term (see :func:`soft_kl`).
        direction: KL direction (see :func:`soft_kl`).
        logit_loss: soft term: "kl" = T² · KL (see :func:`soft_kl`), "mse" = :func:`logit_mse`.
    """
    if alpha >= 1.0:
        if hard_loss is None:
            raise ValueError("alpha = 1 needs the hard-label loss")
        return hard_loss
    if logit_loss == "kl":
        soft = soft_kl(student_logits, teacher_logits, temperature, mask, direction)
    elif logit_loss == "mse":
        soft = logit_mse(student_logits, teacher_logits, mask)
    else:
        raise ValueError(f"logit loss {logit_loss!r} is not 'kl' or 'mse'")
    if alpha <= 0.0 or hard_loss is None:
        return soft
    return alpha * hard_loss + (1.0 - alpha) * soft


def causal_kd_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) mask of positions whose next token is real: where the shifted CE counts too."""
    return labels[:, 1:] != -100


def uniform_hidden_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher hidden-state index for each student hidden state (index 0 = embeddings).

    TinyBERT's uniform map g(k) = k · L_t / L_s, rounded: student layer k's output is matched
    with teacher layer g(k)'s output; the embeddings (k = 0) with the teacher's embeddings.
    """
    return [round(k * n_teacher / n_student) for k in range(n_student + 1)]


def hidden_mse(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
               hidden_map: Sequence[int], attention_mask: torch.Tensor,
               projection: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean over matched pairs of the per-token MSE between hidden states (padding excluded).

    Args:
        student_hidden: L_s + 1 tensors (B, T, d_s): embeddings, then each layer's output.
        teacher_hidden: L_t + 1 tensors (B, T, d_t).
        hidden_map: for each student index k, the teacher index matched with it.
        attention_mask: (B, T), 1 for real tokens.
        projection: maps d_s → d_t (a learned Linear) when the widths differ; None if equal.
    """
    if len(hidden_map) != len(student_hidden):
        raise ValueError(f"hidden map has {len(hidden_map)} entries for {len(student_hidden)} student states")
    m = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for k, tk in enumerate(hidden_map):
        hs = student_hidden[k].float()
        if projection is not None:
            hs = projection(hs)  # (B, T, d_t)
        ht = teacher_hidden[tk].float()
        se = ((hs - ht) ** 2 * m).sum() / (m.sum().clamp_min(1.0) * ht.shape[-1])
        total = total + se
    return total / len(hidden_map)


def attention_kl(student_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor],
                 layer_map: Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) between attention distributions of matched layers.

    Args:
        student_attn: L_s tensors (B, H_s, T, T), rows are softmax distributions over keys.
        teacher_attn: L_t tensors (B, H_t, T, T).
        layer_map: teacher layer index for each student layer.
        attention_mask: (B, T); padded query rows are excluded (padded keys have p = 0).
    """
    if len(layer_map) != len(student_attn):
        raise ValueError(f"layer map has {len(layer_map)} entries for {len(student_attn)} student layers")
    q = attention_mask.float()  # (B, T)
    total = student_attn[0].new_zeros((), dtype=torch.float32)
    for j, tj in enumerate(layer_map):
        a_s, a_t = student_attn[j].float(), teacher_attn[tj].float()
        if a_s.shape[1] != a_t.shape[1]:  # different head counts: compare head-averaged maps
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        # Σ_k p_t (log p_t − log p_s); p_t = 0 terms vanish (masked keys), clamp avoids log 0.
        kl = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1)  # (B, H, T)
        w = q.unsqueeze(1).expand_as(kl)
        total = total + (kl * w).sum() / w.sum().clamp_min(1.0)
    return total / len(layer_map)
