"""Metrics of an in-memory model on tokenized data: accuracy, macro-F1 and a per-class report
for classifiers, perplexity (over every labelled token) for LMs.

A leaf of ``slimtune.evaluate``: :mod:`slimtune.evaluate.evaluator` (folders and files) and
:mod:`slimtune.evaluate.generation` (chat answers) both build on it. Batches are sorted by
length, so padding costs almost nothing, and predictions are put back in file order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from slimtune.data.datasets import TokenizedData, collate, epoch_batches


def classification_metrics(preds: list[int], labels: list[int], label_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    n = len(labels)
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c, name in enumerate(label_names):
        tp = sum(1 for p, y in zip(preds, labels, strict=True) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels, strict=True) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels, strict=True) if p != c and y == c)
        support = tp + fn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or tp + fp:
            f1s.append(f1)
    accuracy = sum(1 for p, y in zip(preds, labels, strict=True) if p == y) / n if n else 0.0
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "n": n, "per_class": per_class}


def _forward_batches(model: torch.nn.Module, data: TokenizedData, batch_size: int,
                     fn: Callable[[dict[str, torch.Tensor], torch.Tensor], None]) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False, group_by_length=True):
            batch = {k: v.to(device) for k, v in collate(data, idx).items()}
            fn(batch, torch.tensor(idx))
    model.train(was_training)


def predict_logits(model: torch.nn.Module, data: TokenizedData, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, C) of a classifier for every example, in file order."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        batch.pop("labels", None)
        out.append((idx, model(**batch).logits.float().cpu()))

    _forward_batches(model, data, batch_size, step)
    n = len(data)
    logits = torch.empty(n, out[0][1].shape[-1])
    for idx, lg in out:
        logits[idx] = lg
    return logits


def evaluate_classifier(model: torch.nn.Module, data: TokenizedData, label_names: list[str],
                        batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class report and mean cross-entropy on labelled ``data``."""
    if data.labels is None:
        raise ValueError("evaluation data has no labels")
    logits = predict_logits(model, data, batch_size)
    labels = torch.tensor(data.labels)
    metrics = classification_metrics(logits.argmax(-1).tolist(), data.labels, label_names)
    metrics["loss"] = torch.nn.functional.cross_entropy(logits, labels).item()
    return metrics


def evaluate_causal_lm(model: torch.nn.Module, data: TokenizedData, batch_size: int = 8) -> dict[str, Any]:
    """Token-level mean NLL over every predicted token, and perplexity = exp(NLL)."""
    total = {"nll": 0.0, "tokens": 0}

    def step(batch: dict[str, torch.Tensor], idx: torch.Tensor) -> None:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()  # (B, T, V)
        # Predict token t+1 from positions <= t: shift by one.
        lg, tgt = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        total["nll"] += torch.nn.functional.cross_entropy(lg, tgt, ignore_index=-100, reduction="sum").item()
        total["tokens"] += int((tgt != -100).sum())

    _forward_batches(model, data, batch_size, step)
    nll = total["nll"] / max(total["tokens"], 1)
    return {"loss": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": total["tokens"]}
