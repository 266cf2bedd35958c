"""Batch prediction over tokenized data with any ``predict(batch) -> logits`` callable."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtune.data.datasets import TokenizedData, collate, epoch_batches

Predict = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def predict_all(predict: Predict, data: TokenizedData, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, C) of ``predict`` over ``data`` in file order (length-sorted batches)."""
    out: list[tuple[list[int], torch.Tensor]] = []
    with torch.inference_mode():
        for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False, group_by_length=True):
            batch = collate(data, idx)
            batch.pop("labels", None)
            out.append((idx, predict(batch).float()))
    logits = torch.empty(len(data), out[0][1].shape[-1])
    for idx, lg in out:
        logits[torch.tensor(idx)] = lg
    return logits


def torch_predict(model: nn.Module) -> Predict:
    """A Predict for any HF classifier (eval mode, inference mode)."""
    model.eval()

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch).logits

    return run


