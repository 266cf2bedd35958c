"""ALBERT-style parameter sharing applied to an already pretrained model, then recovery fine-tuning.

Cross-layer sharing (Lan et al., 2020, §3.1): the transformer blocks are split into groups and
every block of a group uses the *same* ``nn.Parameter`` objects (a 6-layer MiniLM with
``groups: 3`` runs layers 0-1, 2-3, 4-5 on three distinct weight sets). The shared weights
start as the mean of the group's members (``init: mean``) or as its first member
(``init: first``); the normal training loop then fine-tunes the shared model ("recovery").
Because the members hold the same Parameter objects, ``model.parameters()`` lists each once
and the optimizer updates it once per step with the sum of its gradients from every layer.

Optional factorised embeddings (ALBERT's other reduction, ``embedding_rank: k``): the
``V x H`` word-embedding matrix becomes ``V x k`` times ``k x H``, initialised from its
truncated SVD. In a small encoder the embeddings are half the bytes (MiniLM-L6: 11.7M of
22.7M parameters), so sharing layers alone cannot shrink it below ~60%.

What it saves: BYTES, NOT FLOPs. Every layer still runs; a 6->3 shared model does the same
matrix multiplications as the original, so latency is unchanged (factorised embeddings even
add one small matmul). Use it when storage or download size matters.

Stored once on disk: ``model_shared.safetensors`` holds every distinct tensor once (shared
blocks under their first member's name), ``slimtune_method.json`` maps layers to shared blocks,
``config.json`` is the model's own config. :func:`load_exported` rebuilds the structure and
loads it exactly; ``slimtune evaluate --model DIR`` uses it. Plain ``transformers`` refuses
the folder (no ``model.safetensors``) rather than load half the layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from slimtune.methods import MethodContext, register_method

WEIGHTS_NAME = "model_shared.safetensors"


@dataclass
class SharingMethodConfig:
    """Cross-layer parameter sharing (ALBERT-style) + recovery fine-tuning."""

    groups: int | list[list[int]] = field(default=0, metadata={"help": "sharing: number of shared blocks (consecutive layers split evenly; 0: pairs of layers) or explicit groups of layer indices, e.g. [[0,1],[2,3,4,5]]."})
    init: Literal["mean", "first"] = field(default="mean", metadata={"help": "sharing: shared block starts as the mean of its members or as the first member."})
    embedding_rank: int = field(default=0, metadata={"help": "sharing: factorise the word embeddings to rank k (ALBERT; SVD init); 0 keeps them."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "sharing: keep the (possibly factorised) embeddings frozen during recovery."})

    def validate(self, recipe: Any) -> None:
        from slimtune.config import RecipeError

        if isinstance(self.groups, int) and self.groups < 0:
            raise RecipeError(f"method.groups: must be >= 0, got {self.groups}")
        if isinstance(self.groups, list):
            flat = [i for g in self.groups for i in g]
            if any(not g for g in self.groups) or len(flat) != len(set(flat)) or any(i < 0 for i in flat):
                raise RecipeError(f"method.groups: groups must be non-empty and disjoint lists of layer indices, got {self.groups}")
        if self.embedding_rank < 0:
            raise RecipeError(f"method.embedding_rank: must be >= 0, got {self.embedding_rank}")


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer blocks: the largest ``nn.ModuleList`` of >= 2 same-class modules.

    Works for BERT-like (``bert.encoder.layer``), Llama-like (``model.layers``), GPT-2
    (``transformer.h``) and most others; raises ValueError when there is none.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > 0 and (best is None or n > best[0]):
                best = (n, name, mod)
    if best is None:
        raise ValueError(f"sharing: no stack of identical transformer blocks found in {type(model).__name__}")
    return best[1], best[2]


def resolve_groups(groups: int | list[list[int]], n_layers: int) -> list[list[int]]:
    """Explicit groups of layer indices covering ``range(n_layers)`` exactly once.

    An integer k splits the layers into k consecutive runs of near-equal size (earlier runs
    take the remainder); 0 means ceil(n/2) runs, i.e. pairs of layers.
    """
    from slimtune.config import RecipeError

    if isinstance(groups, int):
        k = groups or math.ceil(n_layers / 2)
        if not 1 <= k <= n_layers:
            raise RecipeError(f"method.groups: {groups} shared blocks for a model with {n_layers} layers (need 1..{n_layers})")
        base, extra = divmod(n_layers, k)
        out, start = [], 0
        for g in range(k):
            size = base + (1 if g < extra else 0)
            out.append(list(range(start, start + size)))
            start += size
        return out
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n_layers)):
        raise RecipeError(f"method.groups: {groups} must use every layer index 0..{n_layers - 1} exactly once")
    return [list(g) for g in groups]


def _set_param(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, param)


def share_layers(layers: nn.ModuleList, groups: list[list[int]], init: str | None) -> None:
    """Make every layer of a group use the group's first layer's Parameters (in place).

    ``init``: 'mean' sets the shared values to the members' mean, 'first' keeps the first
    member's, None leaves them (used when loading, the file then provides the values).
    Modules stay distinct objects (per-layer attributes such as a KV-cache ``layer_idx`` keep
    working); only their Parameters are shared.
    """
    for g in groups:
        rep = layers[g[0]]
        rep_params = dict(rep.named_parameters())
        for i in g[1:]:
            other = dict(layers[i].named_parameters())
            if other.keys() != rep_params.keys() or any(other[k].shape != p.shape for k, p in rep_params.items()):
                raise ValueError(f"sharing: layers {g[0]} and {i} have different parameters; cannot share")
        with torch.no_grad():
            if init == "mean" and len(g) > 1:
                for k, p in rep_params.items():
                    p.copy_(torch.stack([layers[i].get_parameter(k) for i in g]).mean(0))
        for i in g[1:]:
            for k, p in rep_params.items():
                _set_param(layers[i], k, p)


class FactorizedEmbedding(nn.Module):
    """A ``V x H`` embedding computed as ``proj(small(ids))``: ``V x k`` lookup, ``k -> H`` linear."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.small = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)  # (V, k)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)  # weight (H, k)

    @property
    def weight(self) -> torch.Tensor:
        """The full ``(V, H)`` matrix, for code that reads ``embedding.weight``."""
        return self.proj(self.small.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        return self.proj(self.small(ids))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, rank: int) -> FactorizedEmbedding:
        """Best rank-``rank`` approximation of ``emb.weight`` (truncated SVD, Eckart-Young)."""
        V, H = emb.weight.shape
        out = cls(V, H, rank, emb.padding_idx).to(emb.weight.device, emb.weight.dtype)
        U, S, Vh = torch.linalg.svd(emb.weight.detach().float(), full_matrices=False)  # (V,H),(H,),(H,H)
        with torch.no_grad():
            out.small.weight.copy_(U[:, :rank] * S[:rank])  # (V, k)
            out.proj.weight.copy_(Vh[:rank].T)  # (H, k): W ~ small @ proj.weight.T
        return out


def factorize_embeddings(model: nn.Module, rank: int, init: bool = True) -> None:
    """Replace the input word embeddings with a :class:`FactorizedEmbedding` of ``rank``."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"sharing: input embeddings are {type(emb).__name__}, not nn.Embedding")
    V, H = emb.weight.shape
    if not 1 <= rank < H:
        raise ValueError(f"sharing: method.embedding_rank must be in [1, {H}) for hidden size {H}, got {rank}")
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and out_emb.weight is emb.weight:
        raise ValueError("sharing: embedding_rank needs untied output embeddings (this model ties its LM head to them)")
    fact = FactorizedEmbedding.from_embedding(emb, rank) if init else \
        FactorizedEmbedding(V, H, rank, emb.padding_idx).to(emb.weight.device, emb.weight.dtype)
    model.set_input_embeddings(fact)


def apply_structure(model: nn.Module, info: dict[str, Any], init: str | None) -> None:
    """Factorise embeddings and share layers as ``info`` says (from :func:`_plan` or the sidecar)."""
    if info.get("embedding_rank"):
        factorize_embeddings(model, info["embedding_rank"], init=init is not None)
    _, layers = find_layers(model)
    share_layers(layers, info["groups"], init)


def _plan(model: nn.Module, cfg: SharingMethodConfig, ctx: MethodContext) -> dict[str, Any]:
    path, layers = find_layers(model)
    groups = resolve_groups(cfg.groups, len(layers))
    return {"method": "sharing", "format_version": 1, "weights": WEIGHTS_NAME, "layers": path,
            "groups": groups, "layer_to_block": {str(i): b for b, g in enumerate(groups) for i in g},
            "init": cfg.init, "embedding_rank": cfg.embedding_rank, "base_model": ctx.base_model}


def load_exported(path: Path, task: str, dtype: str = "float32") -> nn.Module:
    """Rebuild a shared model from its folder (called by ``slimtune.models.load_model``)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    info = json.loads((path / "slimtune_method.json").read_text())
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    apply_structure(model, info, init=None)
    load_model(model, str(path / info.get("weights", WEIGHTS_NAME)), strict=True)
    model.eval()
    return model


class SharingMethod:
    name = "sharing"
    config_cls = SharingMethodConfig
    load_exported = staticmethod(load_exported)  # used by slimtune.models.load_model

    def apply(self, model: nn.Module, cfg: SharingMethodConfig, ctx: MethodContext) -> nn.Module:
        info = _plan(model, cfg, ctx)
        apply_structure(model, info, init=cfg.init)
        for p in model.parameters():
            p.requires_grad_(True)
        if cfg.freeze_embeddings:
            for p in model.get_input_embeddings().parameters():
                p.requires_grad_(False)
        model._slimtune_sharing = info  # read back by export
        return model

    def on_step_end(self, model: nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: nn.Module, cfg: SharingMethodConfig, out_dir: Path, ctx: MethodContext) -> nn.Module:
        from safetensors.torch import save_model

        # save_model writes each storage once: shared blocks (and tied embeddings) are not duplicated.
        save_model(model, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)
        (out_dir / "slimtune_method.json").write_text(json.dumps(model._slimtune_sharing, indent=1))
        return model


register_method(SharingMethod())
