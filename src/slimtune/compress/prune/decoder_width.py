"""Width pruning of decoders: FFN neurons and whole KV groups of attention heads.

A SwiGLU FFN neuron i is row i of ``gate_proj`` and ``up_proj`` and column i of ``down_proj``.
Under grouped-query attention a KV head is shared by ``num_attention_heads /
num_key_value_heads`` query heads, so the unit removed is a *KV group*: its K and V rows, the
rows of its query heads in ``q_proj`` and their columns in ``o_proj`` (SmolLM2-135M: 9 query
heads in 3 groups of 3; removing one group leaves 6 query heads and 2 KV heads of 64).
``head_dim`` is kept and written explicitly into the config, so a plain ``LlamaConfig``
describes the narrower attention (q/o are 384 wide, the residual stream stays 576).

Importance, per layer (each layer keeps its own best units; the count is the same in every
layer because the config has one ``intermediate_size`` and one head count):

- ``activation`` (default for decoders): the mean norm of the unit's contribution to the
  residual stream over calibration tokens. A neuron contributes ``a_i * W_down[:, i]``, so its
  score is ``mean_t |a_i| * ||W_down[:, i]||`` (``a`` = the input of ``down_proj``); a KV group
  contributes ``W_o[:, G] x_G`` (``x_G`` = its query heads' slice of the input of ``o_proj``), so
  its score is ``mean_t ||W_o[:, G] x_G,t||``. This is the structured form of Wanda's
  |weight| x |activation| (Sun et al. 2023; FLAP, An et al. 2024, scores output columns alike).
- ``magnitude``: weights only, ``||gate_i|| ||up_i|| ||down_i||`` and ``||W_v[g]|| ||W_o[:, G]||``.
- ``taylor``: first-order Taylor estimate of the loss change (Molchanov et al. 2019) from a gate
  on each input column of ``down_proj`` / ``o_proj``: ``|sum_{j in unit} sum_k W[k, j] dL/dW[k, j]|``.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtune.compress.prune.decoder_arch import (
    DecoderPruneError,
    decoder_layers,
    head_layout,
    rebuild,
)
from slimtune.compress.prune.decoder_calib import forward_with_hooks
from slimtune.compress.prune.structured import plan_ffn, top_indices

IMPORTANCE = ("activation", "magnitude", "taylor")


def plan_kv_groups(kv_heads: int, heads_frac: float) -> int:
    """KV groups kept per layer when ``heads_frac`` of the heads are removed (at least one)."""
    if not 0 <= heads_frac < 1:
        raise DecoderPruneError(f"--heads: the fraction to remove must be in [0, 1), got {heads_frac}")
    return max(1, min(kv_heads, int(round(kv_heads * (1 - heads_frac)))))


def _group_columns(kv_heads: int, rep: int, head_dim: int) -> list[slice]:
    """The q_proj rows / o_proj columns of each KV group's query heads."""
    return [slice(g * rep * head_dim, (g + 1) * rep * head_dim) for g in range(kv_heads)]


def _magnitude(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    _, kv, d = head_layout(model.config)
    rep = head_layout(model.config)[0] // kv
    ffn, heads = [], []
    with torch.no_grad():
        for layer in decoder_layers(model):
            mlp, att = layer.mlp, layer.self_attn
            ffn.append(mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))
            v = att.v_proj.weight.view(kv, d, -1).flatten(1).norm(dim=1)  # (kv,)
            o = torch.stack([att.o_proj.weight[:, cols].norm() for cols in _group_columns(kv, rep, d)])
            heads.append(v * o)
    return torch.stack(ffn).float().cpu(), torch.stack(heads).float().cpu()


def _activation(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    heads_n, kv, d = head_layout(model.config)
    groups = _group_columns(kv, heads_n // kv, d)
    layers = decoder_layers(model)
    inter = layers[0].mlp.down_proj.in_features
    ffn = torch.zeros(len(layers), inter, dtype=torch.float64)
    heads = torch.zeros(len(layers), kv, dtype=torch.float64)
    count = {"tokens": 0}

    def ffn_hook(i: int) -> Any:
        def hook(mod: torch.nn.Module, x: torch.Tensor, out: Any, mask: torch.Tensor) -> None:
            ffn[i] += x[mask].float().abs().sum(0).double().cpu()  # (I,)
            if i == 0:
                count["tokens"] += int(mask.sum())
        return hook

    def head_hook(i: int) -> Any:
        def hook(mod: torch.nn.Module, x: torch.Tensor, out: Any, mask: torch.Tensor) -> None:
            xs = x[mask].float()  # (N, H*d)
            w = mod.weight.float()
            for g, cols in enumerate(groups):
                heads[i, g] += (xs[:, cols] @ w[:, cols].T).norm(dim=-1).sum().double().cpu()
        return hook

    hooks = [(layer.mlp.down_proj, ffn_hook(i)) for i, layer in enumerate(layers)]
    hooks += [(layer.self_attn.o_proj, head_hook(i)) for i, layer in enumerate(layers)]
    forward_with_hooks(model, batches, hooks)
    n = max(count["tokens"], 1)
    with torch.no_grad():
        down_norms = torch.stack([layer.mlp.down_proj.weight.float().norm(dim=0).cpu() for layer in layers])
    return (ffn / n).float() * down_norms, (heads / n).float()


def _taylor(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    heads_n, kv, d = head_layout(model.config)
    groups = _group_columns(kv, heads_n // kv, d)
    layers = decoder_layers(model)
    outs = [(layer.mlp.down_proj, layer.self_attn.o_proj) for layer in layers]
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for down, o in outs:
        down.weight.requires_grad_(True)
        o.weight.requires_grad_(True)
    ffn = torch.zeros(len(layers), outs[0][0].in_features)
    heads = torch.zeros(len(layers), kv)

    def on_loss(loss: torch.Tensor) -> None:
        loss.backward()
        with torch.no_grad():
            for i, (down, o) in enumerate(outs):
                ffn[i] += (down.weight * down.weight.grad).sum(0).abs().float().cpu()
                col = (o.weight * o.weight.grad).sum(0)  # dL/d gate of each o_proj input column
                heads[i] += torch.stack([col[c].sum().abs() for c in groups]).float().cpu()
                down.weight.grad = o.weight.grad = None

    try:
        forward_with_hooks(model, batches, [], grad=True, on_loss=on_loss)
    finally:
        for p, (rg, g) in saved.items():
            p.requires_grad_(rg)
            p.grad = g
    return ffn, heads


def width_importance(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], importance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(FFN neuron scores (L, I), KV group scores (L, kv))``: higher is more important."""
    if importance == "magnitude":
        return _magnitude(model)
    if importance == "activation":
        return _activation(model, batches)
    if importance == "taylor":
        return _taylor(model, batches)
    raise DecoderPruneError(f"--importance: {importance!r} is not one of {list(IMPORTANCE)} for decoders")


def slice_width(model: torch.nn.Module, ffn_idx: torch.Tensor | None, kv_idx: torch.Tensor | None) -> torch.nn.Module:
    """A narrower model of the same class keeping FFN neurons ``ffn_idx`` (L, kf) and KV groups ``kv_idx`` (L, kg).

    Either may be None (that part is kept whole). The config gets ``intermediate_size``,
    ``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim``.
    """
    heads_n, kv, d = head_layout(model.config)
    rep = heads_n // kv
    names = {id(p): n for n, p in model.named_parameters()}
    state = {k: v.detach() for k, v in model.state_dict().items()}

    def put(param: torch.Tensor | None, value: torch.Tensor) -> None:
        if param is not None:
            state[names[id(param)]] = value.contiguous()

    for i, layer in enumerate(decoder_layers(model)):
        mlp, att = layer.mlp, layer.self_attn
        if ffn_idx is not None:
            n = ffn_idx[i]
            for lin in (mlp.gate_proj, mlp.up_proj):
                put(lin.weight, lin.weight.detach()[n])  # (kf, hidden)
                put(lin.bias, lin.bias.detach()[n] if lin.bias is not None else None)
            put(mlp.down_proj.weight, mlp.down_proj.weight.detach()[:, n])  # (hidden, kf)
        if kv_idx is not None:
            groups = kv_idx[i].tolist()
            q_rows = torch.cat([torch.arange(g * rep * d, (g + 1) * rep * d) for g in groups])
            kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in groups])
            for lin, rows in ((att.q_proj, q_rows), (att.k_proj, kv_rows), (att.v_proj, kv_rows)):
                put(lin.weight, lin.weight.detach()[rows])
                put(lin.bias, lin.bias.detach()[rows] if lin.bias is not None else None)
            put(att.o_proj.weight, att.o_proj.weight.detach()[:, q_rows])
    changes: dict[str, Any] = {"head_dim": d}
    if ffn_idx is not None:
        changes["intermediate_size"] = int(ffn_idx.shape[1])
    if kv_idx is not None:
        changes.update(num_attention_heads=int(kv_idx.shape[1]) * rep, num_key_value_heads=int(kv_idx.shape[1]))
    return rebuild(model, state, **changes)


def prune_width(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, ffn: float = 0.0,
                heads: float = 0.0, importance: str = "activation") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Remove ``ffn`` of the FFN neurons and ``heads`` of the KV groups in every layer; return ``(model, record)``."""
    heads_n, kv, d = head_layout(model.config)
    inter = int(model.config.intermediate_size)
    k_ffn, k_kv = plan_ffn(inter, ffn), plan_kv_groups(kv, heads)
    if heads and k_kv == kv:
        raise DecoderPruneError(f"--heads {heads}: removes no KV group ({kv} groups of {heads_n // kv} query heads; "
                                f"one group is {1 / kv:.2f} of the heads)")
    if k_ffn == inter and k_kv == kv:
        return model, {}
    ffn_scores, kv_scores = width_importance(model, batches, importance)
    ffn_idx = top_indices(ffn_scores, k_ffn) if k_ffn < inter else None
    kv_idx = top_indices(kv_scores, k_kv) if k_kv < kv else None
    new = slice_width(model, ffn_idx, kv_idx)
    record = {"importance": importance, "intermediate_before": inter, "intermediate_after": k_ffn,
              "ffn_requested_fraction": ffn, "heads_before": heads_n, "heads_after": k_kv * (heads_n // kv),
              "kv_heads_before": kv, "kv_heads_after": k_kv, "head_dim": d,
              "kept_kv_groups": kv_idx.tolist() if kv_idx is not None else None,
              "kv_group_scores": kv_scores.tolist() if kv_idx is not None else None}
    return new, record
