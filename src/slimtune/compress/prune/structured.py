"""Structured pruning: remove whole FFN neurons and whole layers, giving a smaller dense model.

Importance (per layer, per neuron):

- ``magnitude``: neuron i by ||W_up[i, :]|| * ||W_down[:, i]|| (in and out weights of its path).
- ``taylor``: first-order Taylor estimate of the loss change when the neuron is removed
  (Molchanov et al. 2019): |dL/d xi| for a gate xi = 1 on its output, summed in absolute value
  over a few training batches. The gate gradient needs no hooks: for an input column j of the
  next Linear W (out, in), dL/d xi_j = sum_k W[k, j] * dL/dW[k, j].
- layers: greedy leave-one-out: drop the layer whose removal changes the model's logits least
  (KL to the unpruned logits on a few training batches), then repeat.

FFN pruning is uniform across layers (the same number of neurons kept in every layer, each layer
choosing its own by importance) because a transformers config has one ``intermediate_size``.

Why no attention-head removal: the checkpoint must reload with plain transformers (no custom
code). In transformers 5.x ``BertSelfAttention`` sets the head size to
``hidden_size // num_attention_heads`` and ``BertSelfOutput`` is ``Linear(hidden_size,
hidden_size)``, so q/k/v/o are always hidden x hidden: a BERT config cannot describe 6 heads of
32 in a 384-wide model (it means 6 heads of 64, the same compute). DeBERTa-v2 (which with
``relative_attention=false`` computes BERT's function) reads an explicit
``attention_head_size``, but its ``DebertaV2SelfOutput`` is also ``Linear(hidden_size,
hidden_size)``, so loading a sliced (384 x 192) output projection fails; ``prune_heads`` and
``config.pruned_heads`` were removed in transformers 5. Zeroing heads instead would keep every
byte and every FLOP. Whole-layer removal is the attention saving that plain BERT can express,
so :func:`prune_structured` refuses ``heads`` with this explanation and offers ``layers``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from slimtune.data.datasets import TokenizedData, collate, epoch_batches

SUPPORTED = ("bert", "roberta", "xlm-roberta")


class StructuredPruneError(ValueError):
    """The model cannot be structurally pruned as asked (the message says why)."""


HEADS_UNSUPPORTED = (
    "removing attention heads cannot be saved as a checkpoint that plain transformers reloads: "
    "BERT-family configs fix the head size to hidden_size // num_attention_heads and the attention "
    "output projection to hidden_size x hidden_size (DeBERTa-v2's attention_head_size hits the same "
    "output projection; prune_heads/pruned_heads are gone in transformers 5). Use --layers N to remove "
    "whole layers (their heads and neurons) and --ffn F for FFN neurons; see docs/pruning.md")


def architecture(model: torch.nn.Module) -> str:
    """The model_type if it is a supported encoder classifier (BERT family); else an error."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise StructuredPruneError(f"structured pruning supports {', '.join(SUPPORTED)} encoders; got model_type {kind!r}")
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise StructuredPruneError("structured pruning supports encoder-only models")
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise StructuredPruneError(f"structured pruning supports sequence classifiers; got {type(model).__name__}")
    return kind


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks, in order."""
    return model.base_model.encoder.layer


def ffn_linears(layer: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """(up, down) projections of one block: hidden -> intermediate -> hidden."""
    return layer.intermediate.dense, layer.output.dense


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------


def magnitude_importance(model: torch.nn.Module) -> torch.Tensor:
    """FFN neuron scores (L, I) from weight norms: ||W_up[i, :]|| * ||W_down[:, i]||."""
    with torch.no_grad():
        scores = [up.weight.norm(dim=1) * down.weight.norm(dim=0)
                  for up, down in map(ffn_linears, encoder_layers(model))]
    return torch.stack(scores).float().cpu()


def _batches(data: TokenizedData, num_batches: int, batch_size: int, seed: int) -> list[list[int]]:
    batches = epoch_batches(data.lengths(), batch_size, seed, 0)[:num_batches]
    if not batches:
        raise StructuredPruneError("importance needs training data; the data set is empty")
    return batches


def taylor_importance(model: torch.nn.Module, data: TokenizedData, *, num_batches: int = 8,
                      batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """FFN neuron scores (L, I): sum over batches of |dL/d gate| (first-order Taylor).

    Runs ``num_batches`` forward/backward passes in eval mode (no dropout) on labelled ``data``;
    parameters' ``requires_grad`` and ``.grad`` are restored afterwards.
    """
    layers = encoder_layers(model)
    device = next(model.parameters()).device
    downs = [ffn_linears(layer)[1] for layer in layers]
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for d in downs:
        d.weight.requires_grad_(True)
    scores = torch.zeros(len(layers), downs[0].in_features)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(data, num_batches, batch_size, seed):
            batch = {k: v.to(device) for k, v in collate(data, idx).items()}
            model(**batch).loss.backward()
            with torch.no_grad():
                for i, d in enumerate(downs):
                    # (out, I) * (out, I) summed over out: dL/d xi for each neuron's gate, (I,)
                    scores[i] += (d.weight * d.weight.grad).sum(0).abs().float().cpu()
                    d.weight.grad = None
    finally:
        for p, (rg, g) in saved.items():
            p.requires_grad_(rg)
            p.grad = g
        model.train(was_training)
    return scores


def _logits(model: torch.nn.Module, data: TokenizedData, batches: list[list[int]]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for idx in batches:
            batch = {k: v.to(device) for k, v in collate(data, idx).items() if k != "labels"}
            out.append(model(**batch).logits.float().cpu())
    return torch.cat(out)


def choose_layers_to_drop(model: torch.nn.Module, n_drop: int, data: TokenizedData, *, num_batches: int = 8,
                          batch_size: int = 16, seed: int = 0) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy leave-one-out: ``n_drop`` times, drop the layer whose removal moves the logits least.

    The change is KL(unpruned || candidate) of the class distributions on a few training batches.
    Returns the dropped layer indices (ascending) and the per-round scores for the record.
    """
    layers = encoder_layers(model)
    if not 0 <= n_drop < len(layers):
        raise StructuredPruneError(f"--layers: can remove 0..{len(layers) - 1} of {len(layers)} layers, got {n_drop}")
    batches = _batches(data, num_batches, batch_size, seed)
    was_training = model.training
    model.eval()
    full = list(layers)
    ref = _logits(model, data, batches).log_softmax(-1)
    kept, dropped, rounds = list(range(len(full))), [], []
    try:
        for _ in range(n_drop):
            cost = {}
            for cand in kept:
                model.base_model.encoder.layer = torch.nn.ModuleList([full[i] for i in kept if i != cand])
                lp = _logits(model, data, batches).log_softmax(-1)
                cost[cand] = float((ref.exp() * (ref - lp)).sum(-1).mean())
            best = min(cost, key=cost.get)
            rounds.append({"dropped": best, "kl": cost})
            kept.remove(best)
            dropped.append(best)
    finally:
        model.base_model.encoder.layer = torch.nn.ModuleList(full)
        model.train(was_training)
    return sorted(dropped), rounds


# --------------------------------------------------------------------------------------------
# Planning and slicing
# --------------------------------------------------------------------------------------------


def plan_ffn(intermediate: int, ffn_frac: float, multiple: int = 8) -> int:
    """FFN neurons kept per layer when ``ffn_frac`` of them are removed.

    Rounded to a multiple of ``multiple`` (friendlier to matmul kernels); at least ``multiple``.
    """
    if not 0 <= ffn_frac < 1:
        raise StructuredPruneError(f"--ffn: the fraction to remove must be in [0, 1), got {ffn_frac}")
    if ffn_frac == 0:
        return intermediate
    return min(intermediate, max(multiple, int(round(intermediate * (1 - ffn_frac) / multiple)) * multiple))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores`` (L, N): indices of the ``k`` largest, in ascending index order."""
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def slice_model(model: torch.nn.Module, ffn_idx: torch.Tensor, keep_layers: list[int] | None = None) -> torch.nn.Module:
    """A new, smaller dense model of the same class keeping ``keep_layers`` and neurons ``ffn_idx``.

    ``ffn_idx`` is (L, kf): the neurons kept in each ORIGINAL layer. Weights are copied by
    physical slicing (up-projection rows and bias, down-projection columns); the config gets
    the new ``intermediate_size`` and ``num_hidden_layers``, so plain
    ``AutoModelForSequenceClassification.from_pretrained`` rebuilds exactly this model.
    """
    architecture(model)
    layers = encoder_layers(model)
    keep_layers = list(range(len(layers))) if keep_layers is None else sorted(keep_layers)
    if ffn_idx.shape[0] != len(layers):
        raise StructuredPruneError(f"ffn_idx covers {ffn_idx.shape[0]} layers, the model has {len(layers)}")
    names = {id(p): n for n, p in model.named_parameters()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for layer, neurons in zip(layers, ffn_idx, strict=True):
        up, down = ffn_linears(layer)
        state[names[id(up.weight)]] = up.weight.detach()[neurons].clone()  # (kf, hidden)
        state[names[id(up.bias)]] = up.bias.detach()[neurons].clone()  # (kf,)
        state[names[id(down.weight)]] = down.weight.detach()[:, neurons].clone()  # (hidden, kf)
    # Renumber kept layers 0..n-1 and drop the others: "encoder.layer.{old}." -> ".{new}."
    renum = {old: new for new, old in enumerate(keep_layers)}
    pat = re.compile(r"(\.encoder\.layer\.)(\d+)\.")
    new_state = {}
    for k, v in state.items():
        m = pat.search(k)
        if m is None:
            new_state[k] = v
        elif int(m.group(2)) in renum:
            new_state[pat.sub(lambda mm: f"{mm.group(1)}{renum[int(mm.group(2))]}.", k, count=1)] = v
    cfg = model.config
    new_cfg = type(cfg).from_dict({**cfg.to_dict(), "intermediate_size": int(ffn_idx.shape[1]),
                                   "num_hidden_layers": len(keep_layers)})
    new = type(model)(new_cfg).to(dtype=next(model.parameters()).dtype)
    new.load_state_dict(new_state, strict=True)
    return new.to(next(model.parameters()).device).train(model.training)


def prune_structured(model: torch.nn.Module, *, heads: float = 0.0, ffn: float = 0.0, layers: int = 0,
                     importance: str = "taylor", data: TokenizedData | None = None,
                     num_batches: int = 8, batch_size: int = 16, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Choose layers to drop and FFN neurons to keep, then slice; return ``(smaller_model, info)``."""
    kind = architecture(model)
    if heads:
        raise StructuredPruneError(HEADS_UNSUPPORTED)
    n_layers = len(encoder_layers(model))
    inter = ffn_linears(encoder_layers(model)[0])[0].out_features
    k_ffn = plan_ffn(inter, ffn)
    if importance not in ("magnitude", "taylor"):
        raise StructuredPruneError(f"--importance: {importance!r} is not one of ['magnitude', 'taylor']")
    if (importance == "taylor" and k_ffn < inter) or layers:
        if data is None:
            raise StructuredPruneError("taylor importance and layer choice need training data (--train)")
    dropped, rounds = [], []
    if layers:
        dropped, rounds = choose_layers_to_drop(model, layers, data, num_batches=num_batches,
                                                batch_size=batch_size, seed=seed)
    if k_ffn < inter:
        scores = (taylor_importance(model, data, num_batches=num_batches, batch_size=batch_size, seed=seed)
                  if importance == "taylor" else magnitude_importance(model))
    else:
        scores = torch.zeros(n_layers, inter)
    ffn_idx = top_indices(scores, k_ffn) if k_ffn < inter else torch.arange(inter).expand(n_layers, inter)
    keep = [i for i in range(n_layers) if i not in dropped]
    new = slice_model(model, ffn_idx, keep)
    info = {"importance": importance, "architecture": kind, "layers_before": n_layers, "layers_after": len(keep),
            "dropped_layers": dropped, "layer_rounds": rounds, "intermediate_before": inter,
            "intermediate_after": k_ffn, "ffn_requested_fraction": ffn}
    return new, info
