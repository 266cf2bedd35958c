"""Depth pruning of decoders: drop the whole layers that change the hidden state least (ShortGPT).

Block influence (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant
Than You Expect"): for layer i with input hidden states x and output hidden states y (the
residual stream before and after the block),

    BI_i = 1 - mean over calibration tokens of cos(x_t, y_t)

A layer whose output points where its input pointed (BI near 0) mostly adds little to the
residual stream; the ``n`` layers of lowest BI are removed in one shot, as in the paper. The
scores are measured on real tokens of the task's training data (padding excluded) and recorded
beside the output (``metrics.json`` -> ``depth``).
"""

from __future__ import annotations

from typing import Any

import torch

from slimtune.compress.prune.decoder_arch import DecoderPruneError, decoder_layers, rebuild
from slimtune.compress.prune.decoder_calib import forward_with_hooks


def block_influence(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[list[float], int]:
    """Per-layer block influence ``1 - mean cos(input, output)`` over the batches' real tokens.

    Returns:
        ``(scores, tokens)``: one score per layer, in layer order, and the token count.
    """
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = {"tokens": 0}

    def hook_for(i: int) -> Any:
        def hook(mod: torch.nn.Module, x: torch.Tensor, out: Any, mask: torch.Tensor) -> None:
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[i] += cos[mask].double().sum().cpu()
            if i == 0:
                count["tokens"] += int(mask.sum())
        return hook

    forward_with_hooks(model, batches, [(layer, hook_for(i)) for i, layer in enumerate(layers)])
    if count["tokens"] == 0:
        raise DecoderPruneError("block influence: the calibration batches hold no tokens")
    return [float(1.0 - s / count["tokens"]) for s in sums], count["tokens"]


def layers_to_drop(scores: list[float], n_drop: int) -> list[int]:
    """The ``n_drop`` layers of lowest block influence (ties: the later layer), ascending."""
    if not 0 <= n_drop < len(scores):
        raise DecoderPruneError(f"can remove 0..{len(scores) - 1} of {len(scores)} layers, got {n_drop}")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n_drop])


def drop_layers(model: torch.nn.Module, drop: list[int]) -> torch.nn.Module:
    """A new model of the same class without layers ``drop`` (config ``num_hidden_layers`` updated)."""
    n = len(decoder_layers(model))
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise DecoderPruneError("cannot remove every layer")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return rebuild(model, state, keep_layers=keep)


def prune_depth(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], n_drop: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Score every layer by block influence, drop the ``n_drop`` lowest; return ``(model, record)``."""
    scores, tokens = block_influence(model, batches)
    drop = layers_to_drop(scores, n_drop)
    new = drop_layers(model, drop) if drop else model
    record = {"criterion": "block influence (ShortGPT): 1 - mean cos(layer input, layer output) over "
                           "calibration tokens; the lowest are dropped",
              "block_influence": scores, "dropped_layers": drop,
              "kept_layers": [i for i in range(len(scores)) if i not in drop],
              "layers_before": len(scores), "layers_after": len(scores) - len(drop), "calibration_tokens": tokens}
    return new, record
