"""ALBERT-style parameter sharing applied to an already pretrained model, then recovery fine-tuning.

Cross-layer sharing (Lan et al., 2020, §3.1): the transformer blocks are split into groups and
every block of a group uses the *same* ``nn.Parameter`` objects (a 6-layer MiniLM with
``groups: 3`` runs layers 0-1, 2-3, 4-5 on three distinct weight sets). The shared weights
start as the mean of the group's members (``init: mean``) or as its first member
(``init: first``); the normal training loop then fine-tunes the shared model ("recovery").
Because the members hold the same Parameter objects, ``model.parameters()`` lists each once
and the optimizer updates it once per step with the sum of its gradients from every layer.

Two relaxations (off by default) give back per-layer freedom at a small byte cost:

- ``share: matrices`` shares only the weight *matrices* (2-D parameters: ``nn.Linear``
  weights); biases and LayerNorm/RMSNorm parameters stay per layer. They are < 1% of a block's
  bytes (MiniLM: 0.3%) but let every layer keep its own scale and offset.
- ``relax_rank: r`` (Relaxed Recursive Transformers, Bae et al., 2024): in every group of two
  or more layers, each member's ``nn.Linear`` becomes a :class:`RelaxedLinear` computing
  ``x @ (W_shared + B_i @ A_i).T + b`` with its own ``B_i (out, r)`` and ``A_i (r, in)``,
  initialised from the truncated SVD of ``W_i_original - W_shared`` (the best rank-r
  correction, exact when r reaches the rank of the difference). Costs ``r * (in + out)``
  numbers per layer and matrix (MiniLM, r=32: 12.5% of a block's matrices, per layer) and two
  rank-r matmuls per Linear at run time. A rank with ``r * (in + out) >= in * out`` stores more
  than not sharing that matrix at all; ``r >= min(in, out)`` is refused.

Optional factorised embeddings (ALBERT's other reduction, ``embedding_rank: k``): the
``V x H`` word-embedding matrix becomes ``V x k`` times ``k x H``, initialised from its
truncated SVD. In a small encoder the embeddings are half the bytes (MiniLM-L6: 11.7M of
22.7M parameters), so sharing layers alone cannot shrink it below ~60%.

What it saves: BYTES, NOT FLOPs. Every layer still runs; a 6->3 shared model does the same
matrix multiplications as the original, so latency is unchanged (factorised embeddings add one
small matmul, ``relax_rank`` adds two rank-r matmuls per Linear). Use it when storage or
download size matters.

Stored once on disk: ``model_shared.safetensors`` holds every distinct tensor once (shared
matrices under one member's name; the per-layer relax factors and unshared norms per layer),
``slimtune_method.json`` (format_version 2; version 1 files, which predate ``share`` and
``relax_rank``, still load) maps layers to shared blocks and records the options,
``config.json`` is the model's own config. :func:`load_exported` rebuilds the structure and
loads it exactly (strict); ``slimtune evaluate --model DIR`` uses it. Plain ``transformers``
refuses the folder (no ``model.safetensors``) rather than load half the layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from slimtune.config.fields import RecipeError, setting
from slimtune.methods import MethodContext, register_method

WEIGHTS_NAME = "model_shared.safetensors"
FORMAT_VERSION = 2  # 2: + "share", "relax_rank" (a version-1 sidecar means "all", 0)


@dataclass
class SharingMethodConfig:
    """Cross-layer parameter sharing (ALBERT-style) + recovery fine-tuning."""

    groups: int | list[list[int]] = setting(0, "sharing: number of shared blocks (consecutive layers split evenly; 0: pairs of layers) or explicit groups of layer indices, e.g. [[0,1],[2,3,4,5]].", ge=0)
    pattern: Literal["block", "cycle"] = setting("block", "sharing: with an integer groups, 'block' shares neighbours (6 layers, 3 groups: 0-1, 2-3, 4-5), 'cycle' layers a period apart (0-3, 1-4, 2-5).")
    init: Literal["mean", "first"] = setting("mean", "sharing: shared block starts as the mean of its members or as the first member.")
    embedding_rank: int = setting(0, "sharing: factorise the word embeddings to rank k (ALBERT; SVD init); 0 keeps them.", ge=0)
    freeze_embeddings: bool = setting(False, "sharing: keep the (possibly factorised) embeddings frozen during recovery.")
    share: Literal["all", "matrices"] = setting("all", "sharing: 'all' shares every parameter of a block; 'matrices' only the weight matrices (2-D), biases and norms stay per layer.")
    relax_rank: int = setting(0, "sharing: per-layer rank-r residual B_i @ A_i on every shared nn.Linear (Relaxed Recursive Transformers; SVD init from W_i - W_shared); 0: none. Must be < min(in, out).", ge=0)

    def validate(self, recipe: Any) -> None:

        if isinstance(self.groups, int) and self.groups < 0:
            raise RecipeError(f"method.groups: must be >= 0, got {self.groups}")
        if isinstance(self.groups, list):
            flat = [i for g in self.groups for i in g]
            if any(not g for g in self.groups) or len(flat) != len(set(flat)) or any(i < 0 for i in flat):
                raise RecipeError(f"method.groups: groups must be non-empty and disjoint lists of layer indices, got {self.groups}")
        if self.embedding_rank < 0:
            raise RecipeError(f"method.embedding_rank: must be >= 0, got {self.embedding_rank}")
        if self.relax_rank < 0:
            raise RecipeError(f"method.relax_rank: must be >= 0, got {self.relax_rank}")
        if self.pattern not in ("block", "cycle"):
            raise RecipeError(f"method.pattern: {self.pattern!r} is not one of ['block', 'cycle']")
        if self.share not in ("all", "matrices"):
            raise RecipeError(f"method.share: {self.share!r} is not one of ['all', 'matrices']")


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


def resolve_groups(groups: int | list[list[int]], n_layers: int, pattern: str = "block") -> list[list[int]]:
    """Explicit groups of layer indices covering ``range(n_layers)`` exactly once.

    An integer k makes k groups (0 means ceil(n/2), i.e. pairs of layers). ``block``: k
    consecutive runs of near-equal size (earlier runs take the remainder). ``cycle``: group g
    holds layers g, g + k, g + 2k, ... (the CYCLE pattern of Relaxed Recursive Transformers,
    Bae et al., 2024). Measured on MiniLM 6 -> 3 after KD recovery: cycle + ``init: first``
    recovers far better (docs/methods.md). Explicit lists ignore ``pattern``.
    """

    if isinstance(groups, int):
        k = groups or math.ceil(n_layers / 2)
        if not 1 <= k <= n_layers:
            raise RecipeError(f"method.groups: {groups} shared blocks for a model with {n_layers} layers (need 1..{n_layers})")
        if pattern == "cycle":
            return [list(range(g, n_layers, k)) for g in range(k)]
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


def share_layers(layers: nn.ModuleList, groups: list[list[int]], init: str | None, share: str = "all") -> None:
    """Make every layer of a group use the group's first layer's Parameters (in place).

    ``init``: 'mean' sets the shared values to the members' mean, 'first' keeps the first
    member's, None leaves them (used when loading, the file then provides the values).
    ``share``: 'all' shares every Parameter, 'matrices' only those with >= 2 dims (Linear /
    Conv1D weights); biases and norm weights keep their own per-layer values.
    Modules stay distinct objects (per-layer attributes such as a KV-cache ``layer_idx`` keep
    working); only their Parameters are shared.
    """
    if share not in ("all", "matrices"):
        raise ValueError(f"sharing: share must be 'all' or 'matrices', got {share!r}")
    for g in groups:
        rep = layers[g[0]]
        rep_params = dict(rep.named_parameters())
        for i in g[1:]:
            other = dict(layers[i].named_parameters())
            if other.keys() != rep_params.keys() or any(other[k].shape != p.shape for k, p in rep_params.items()):
                raise ValueError(f"sharing: layers {g[0]} and {i} have different parameters; cannot share")
        if share == "matrices":
            rep_params = {k: p for k, p in rep_params.items() if p.dim() >= 2}
        with torch.no_grad():
            if init == "mean" and len(g) > 1:
                for k, p in rep_params.items():
                    p.copy_(torch.stack([layers[i].get_parameter(k) for i in g]).mean(0))
        for i in g[1:]:
            for k, p in rep_params.items():
                _set_param(layers[i], k, p)


class RelaxedLinear(nn.Module):
    """A layer's view of a shared Linear plus its own low-rank residual.

    ``y = base(x) + (x @ A.T) @ B.T``, i.e. the effective weight is ``W_shared + B @ A``:
    ``base`` is the layer's own ``nn.Linear`` module whose ``weight`` (out, in) is the group's
    shared Parameter (so it stays one tensor), ``relax_A`` (r, in) and ``relax_B`` (out, r) belong
    to this layer only. The residual runs as two rank-r matmuls; the full weight is never formed.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.relax_A = nn.Parameter(torch.zeros(rank, base.in_features, **kw))  # (r, in)
        self.relax_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # (out, r)

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out, in)`` weight ``W_shared + B @ A``, for code that reads it."""
        return self.base.weight + self.relax_B @ self.relax_A

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.base(x) + nn.functional.linear(nn.functional.linear(x, self.relax_A), self.relax_B)

    @torch.no_grad()
    def init_from_residual(self, delta: torch.Tensor) -> None:
        """Set ``B @ A`` to the best rank-r approximation of ``delta`` (out, in) (Eckart-Young).

        ``B = U_r S_r`` and ``A = V_r^T``: A has orthonormal rows, so a zero residual (the first
        member under ``init: first``) gives B = 0 and a usable A, as in LoRA.
        """
        # fp64 SVD: at full rank the reconstruction is exact up to fp32 rounding.
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out,k),(k,),(k,in)
        r = self.rank
        self.relax_B.copy_(U[:, :r] * S[:r])  # (out, r)
        self.relax_A.copy_(Vh[:r])  # (r, in)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _relaxed_linears(layers: nn.ModuleList, groups: list[list[int]]) -> list[tuple[int, str]]:
    """(layer index, module name) of every nn.Linear in a group of >= 2 layers (singletons
    share nothing, so they get no residual)."""
    out = []
    for g in groups:
        if len(g) > 1:
            names = [n for n, m in layers[g[0]].named_modules() if isinstance(m, nn.Linear)]
            out += [(i, n) for i in g for n in names]
    return out


def relax_layers(layers: nn.ModuleList, groups: list[list[int]], rank: int,
                 originals: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
    """Wrap every shared nn.Linear of a group of >= 2 layers in a :class:`RelaxedLinear` (in place).

    ``rank`` is clipped to ``min(in, out)`` per Linear (full rank: exact reconstruction; the
    recipe path refuses such ranks, :meth:`SharingMethod.apply` checks). ``originals`` maps
    (layer, module name) to the layer's weight before sharing; the residual starts at the
    truncated SVD of ``original - shared``. None leaves zeros (loading: the file has the values).
    """
    for i, name in _relaxed_linears(layers, groups):
        lin = layers[i].get_submodule(name)
        wrapped = RelaxedLinear(lin, min(rank, lin.in_features, lin.out_features))
        if originals is not None:
            wrapped.init_from_residual(originals[(i, name)] - lin.weight.detach())
        parent, _, leaf = name.rpartition(".")
        setattr(layers[i].get_submodule(parent) if parent else layers[i], leaf, wrapped)


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
    """Factorise embeddings, share layers and add relax residuals as ``info`` says (from
    :func:`_plan` or the sidecar; a version-1 sidecar has no ``share``/``relax_rank``)."""
    if info.get("embedding_rank"):
        factorize_embeddings(model, info["embedding_rank"], init=init is not None)
    _, layers = find_layers(model)
    groups, rank = info["groups"], info.get("relax_rank", 0)
    originals = None
    if rank and init is not None:  # each member's own weights, before sharing overwrites them
        originals = {(i, n): layers[i].get_submodule(n).weight.detach().clone()
                     for i, n in _relaxed_linears(layers, groups)}
    share_layers(layers, groups, init, share=info.get("share", "all"))
    if rank:
        relax_layers(layers, groups, rank, originals)


def check_relax_rank(model: nn.Module, groups: list[list[int]], rank: int) -> None:
    """Refuse ``rank >= min(in, out)`` of any Linear it would wrap (RecipeError naming the key):
    such a residual stores more than the unshared matrix."""

    path, layers = find_layers(model)
    for i, name in _relaxed_linears(layers, groups):
        lin = layers[i].get_submodule(name)
        if rank >= min(lin.in_features, lin.out_features):
            raise RecipeError(f"method.relax_rank: {rank} must be < min(in, out) = "
                              f"{min(lin.in_features, lin.out_features)} of {path}.{i}.{name} "
                              f"({lin.out_features}x{lin.in_features}): a residual that large stores more than the unshared matrix")


def _plan(model: nn.Module, cfg: SharingMethodConfig, ctx: MethodContext) -> dict[str, Any]:
    path, layers = find_layers(model)
    groups = resolve_groups(cfg.groups, len(layers), cfg.pattern)
    if cfg.relax_rank:
        check_relax_rank(model, groups, cfg.relax_rank)
    return {"method": "sharing", "format_version": FORMAT_VERSION, "weights": WEIGHTS_NAME, "layers": path,
            "groups": groups, "layer_to_block": {str(i): b for b, g in enumerate(groups) for i in g},
            "init": cfg.init, "embedding_rank": cfg.embedding_rank, "share": cfg.share,
            "relax_rank": cfg.relax_rank, "base_model": ctx.base_model}


def _read_sidecar(file: Path) -> dict[str, Any]:
    """The sidecar, checked; a version-1 file gets the version-2 defaults (share all, no relax)."""
    info = json.loads(file.read_text())
    version = info.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {version!r} is newer than this slimtune reads ({FORMAT_VERSION})")
    info.setdefault("share", "all")
    info.setdefault("relax_rank", 0)
    if info["share"] not in ("all", "matrices"):
        raise ValueError(f"{file}: key 'share' must be 'all' or 'matrices', got {info['share']!r}")
    if not isinstance(info["relax_rank"], int) or info["relax_rank"] < 0:
        raise ValueError(f"{file}: key 'relax_rank' must be an integer >= 0, got {info['relax_rank']!r}")
    return info


def load_exported(path: Path, task: str, dtype: str = "float32") -> nn.Module:
    """Rebuild a shared model from its folder (called by ``slimtune.models.loading.load_model``)."""

    info = _read_sidecar(path / "slimtune_method.json")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    apply_structure(model, info, init=None)
    load_model(model, str(path / info.get("weights", WEIGHTS_NAME)), strict=True)
    model.eval()
    return model


class SharingMethod:
    # Recovery fine-tuning of the shared weights (all of them train): a bit above full
    # fine-tuning, since sharing moved every layer (SST-2 here: 0.762 at 1e-4, 0.787 at 3e-4).
    defaults = {"train.lr": 3e-4, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.min_steps": 0}}
    name = "sharing"
    config_cls = SharingMethodConfig
    load_exported = staticmethod(load_exported)  # used by slimtune.models.loading.load_model

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

        # save_model writes each storage once: shared blocks (and tied embeddings) are not duplicated.
        save_model(model, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)
        (out_dir / "slimtune_method.json").write_text(json.dumps(model._slimtune_sharing, indent=1))
        return model


register_method(SharingMethod())
