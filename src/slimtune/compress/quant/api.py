"""``quantize_(model, Config())``: configs, the handler registry, and quantized modules.

torchao's shape: a dataclass config says *what* to do; a handler registered for the config
class does it to one module (``@register_quantize_handler(Int4WeightConfig)``); ``quantize_``
walks the model and swaps every selected ``nn.Linear`` / ``nn.Embedding`` in place.

The swapped-in :class:`QuantizedLinear` / :class:`QuantizedEmbedding` hold only the compact form
(codes, scales, zero points or codebooks) as buffers and dequantize in ``forward``: this is
weight-only storage compression. Speed on CPU comes from the int8 backends (``backends.py``);
:func:`dequantize_` turns a quantized model back into plain float modules.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.compress.quant.codebook import decode_kmeans, decode_nf4, encode_kmeans, encode_nf4
from slimtune.compress.quant.linear import GRANULARITIES, decode_affine, encode_affine

DEFAULT_SKIP: tuple[str, ...] = ("lm_head",)


def _check_common(cfg: Any) -> None:
    if cfg.granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {cfg.granularity!r}")
    if cfg.granularity == "group" and cfg.group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {cfg.group_size}")


@dataclass
class Int8WeightConfig:
    """int8 weights, linear (affine) code. Per-channel symmetric is the fast-backend default."""

    granularity: str = field(default="channel", metadata={"help": "tensor | channel | group"})
    group_size: int = field(default=128, metadata={"help": "weights per scale when granularity=group"})
    symmetric: bool = field(default=True, metadata={"help": "zero point 0 (True) or asymmetric min/max"})
    include_embeddings: bool = field(default=True, metadata={"help": "quantize nn.Embedding tables too"})
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP, metadata={"help": "fnmatch patterns of module names left in float"})
    scale_dtype: str = field(default="float32", metadata={"help": "storage dtype of scales: float32 | float16"})

    bits = 8

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class Int4WeightConfig:
    """int4 weights, two per byte, group-wise asymmetric by default (GPTQ/AWQ-style layout)."""

    granularity: str = field(default="group", metadata={"help": "tensor | channel | group"})
    group_size: int = field(default=32, metadata={"help": "weights per scale when granularity=group"})
    symmetric: bool = field(default=False, metadata={"help": "zero point 0 (True) or asymmetric min/max"})
    include_embeddings: bool = field(default=True, metadata={"help": "quantize nn.Embedding tables too"})
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP, metadata={"help": "fnmatch patterns of module names left in float"})
    scale_dtype: str = field(default="float16", metadata={"help": "storage dtype of scales: float32 | float16"})

    bits = 4

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class NF4Config:
    """QLoRA's 4-bit NormalFloat code with one absmax per block of ``block_size`` weights."""

    block_size: int = field(default=64, metadata={"help": "consecutive weights sharing one absmax"})
    include_embeddings: bool = field(default=True, metadata={"help": "quantize nn.Embedding tables too"})
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP, metadata={"help": "fnmatch patterns of module names left in float"})

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")


@dataclass
class KMeansConfig:
    """A learned codebook of ``2**bits`` centroids per tensor or per channel (row)."""

    bits: int = field(default=4, metadata={"help": "code width: 2**bits centroids (1..8)"})
    granularity: str = field(default="channel", metadata={"help": "tensor | channel"})
    iters: int = field(default=25, metadata={"help": "Lloyd iterations (stops early on convergence)"})
    include_embeddings: bool = field(default=True, metadata={"help": "quantize nn.Embedding tables too"})
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP, metadata={"help": "fnmatch patterns of module names left in float"})

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"k-means bits must be in 1..8, got {self.bits}")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(f"k-means granularity must be tensor or channel, got {self.granularity!r}")


CONFIGS: dict[str, type] = {"int8": Int8WeightConfig, "int4": Int4WeightConfig, "nf4": NF4Config,
                            "kmeans": KMeansConfig}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config, with its scheme name."""
    name = next(k for k, v in CONFIGS.items() if isinstance(cfg, v))
    d = asdict(cfg)
    d["skip"] = list(d.get("skip", ()))
    return {"scheme": name, **d}


def config_from_dict(d: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`."""
    d = dict(d)
    cls = CONFIGS[d.pop("scheme")]
    if "skip" in d:
        d["skip"] = tuple(d["skip"])
    return cls(**d)


# --------------------------------------------------------------------------------------------
# Encode / decode one weight
# --------------------------------------------------------------------------------------------


def encode_weight(w: torch.Tensor, cfg: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Quantize one 2-D weight as ``cfg`` says; return (meta, tensors)."""
    if isinstance(cfg, (Int8WeightConfig, Int4WeightConfig)):
        gs = cfg.group_size
        if cfg.granularity == "group" and w.shape[1] % gs:
            raise ValueError(f"group_size {gs} does not divide the {w.shape[1]} columns")
        return encode_affine(w, bits=cfg.bits, symmetric=cfg.symmetric, granularity=cfg.granularity,
                             group_size=gs, scale_dtype=getattr(torch, cfg.scale_dtype))
    if isinstance(cfg, NF4Config):
        return encode_nf4(w, cfg.block_size)
    if isinstance(cfg, KMeansConfig):
        return encode_kmeans(w, cfg.bits, cfg.granularity, cfg.iters)
    raise TypeError(f"no encoder for {type(cfg).__name__}")


DECODERS: dict[str, Callable[[dict[str, Any], dict[str, torch.Tensor]], torch.Tensor]] = {
    "affine": decode_affine, "nf4": decode_nf4, "kmeans": decode_kmeans}


def decode_weight(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float weight from (meta, tensors) of any kind."""
    kind = meta.get("kind")
    if kind not in DECODERS:
        raise ValueError(f"unknown quantized tensor kind {kind!r}")
    return DECODERS[kind](meta, tensors)


def storage_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the compact form takes (what is written to disk, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------------------------
# Quantized modules
# --------------------------------------------------------------------------------------------


class _QuantizedWeight(nn.Module):
    """Holds the compact tensors as buffers (so ``.to()`` and ``state_dict`` see them)."""

    def _set_quantized(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.qmeta = meta
        self.qnames = list(tensors)
        for k, t in tensors.items():
            self.register_buffer(k, t)

    def qtensors(self) -> dict[str, torch.Tensor]:
        """The compact tensors by name (qdata, scale, zero_point, absmax, codebook)."""
        return {k: getattr(self, k) for k in self.qnames}

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the codes stand for."""
        return decode_weight(self.qmeta, self.qtensors())


class QuantizedLinear(_QuantizedWeight):
    """``nn.Linear`` whose weight is stored quantized and decoded on every call."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = meta["shape"]
        self._set_quantized(meta, tensors)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {_describe(self.qmeta)}"


class QuantizedEmbedding(_QuantizedWeight):
    """``nn.Embedding`` whose table is stored quantized and decoded on every call."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = meta["shape"]
        self.padding_idx = padding_idx
        self._set_quantized(meta, tensors)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        meta = self.qmeta
        if meta["kind"] == "affine" and meta["bits"] == 8 and meta["granularity"] == "channel":
            # One scale per row: decode only the rows looked up, (B, T, D) instead of the whole
            # (vocab, D) table; same float ops per element as the full decode, so equal bits.
            x = self.qdata[ids].float()
            if "zero_point" in self.qnames:
                x = x - self.zero_point[ids].float()[..., None]
            return (x * self.scale[ids].float()[..., None]).to(getattr(torch, meta.get("dtype", "float32")))
        return F.embedding(ids, self.dequantized_weight(), self.padding_idx)

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` with the dequantized table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.dequantized_weight())
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {_describe(self.qmeta)}"


def _describe(meta: dict[str, Any]) -> str:
    keys = ("kind", "bits", "granularity", "group_size", "block_size", "symmetric")
    return ", ".join(f"{k}={meta[k]}" for k in keys if meta.get(k) is not None)


# --------------------------------------------------------------------------------------------
# Handler registry and quantize_
# --------------------------------------------------------------------------------------------

Handler = Callable[[nn.Module, Any], nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register_quantize_handler(config_cls: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(module, config) -> new module`` becomes the way to apply ``config_cls``."""

    def deco(fn: Handler) -> Handler:
        if config_cls in _HANDLERS and _HANDLERS[config_cls] is not fn:
            raise ValueError(f"a handler for {config_cls.__name__} is already registered")
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def _weight_handler(module: nn.Module, cfg: Any) -> nn.Module:
    meta, tensors = encode_weight(module.weight.detach().float(), cfg)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(meta, tensors, module.padding_idx)
    return QuantizedLinear(meta, tensors, module.bias)


for _cls in (Int8WeightConfig, Int4WeightConfig, NF4Config, KMeansConfig):
    register_quantize_handler(_cls)(_weight_handler)


def tied_weight_ids(model: nn.Module) -> set[int]:
    """ids of weight Parameters used by more than one module (tied input/output embeddings)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):
            seen[id(w)] = seen.get(id(w), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def default_filter(cfg: Any, tied: set[int]) -> Callable[[nn.Module, str], bool]:
    """Linear layers, embeddings when ``cfg.include_embeddings``, minus ``cfg.skip`` and tied weights."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if any(fnmatch.fnmatch(fqn, p) or fnmatch.fnmatch(fqn.rsplit(".", 1)[-1], p) for p in cfg.skip):
            return False
        if isinstance(module, nn.Embedding):
            return cfg.include_embeddings and id(module.weight) not in tied
        return isinstance(module, nn.Linear) and id(module.weight) not in tied

    return keep


def quantize_(model: nn.Module, config: Any,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says; return it.

    Args:
        model: any torch module (HF models included).
        config: an instance of a registered config class (Int8WeightConfig, Int4WeightConfig,
            NF4Config, KMeansConfig, or one registered with :func:`register_quantize_handler`).
        filter_fn: ``(module, fully_qualified_name) -> bool`` choosing modules; default: every
            ``nn.Linear`` (and ``nn.Embedding`` if ``config.include_embeddings``) not matched by
            ``config.skip`` and not sharing its weight with another module.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantize handler registered for {type(config).__name__}")
    keep = filter_fn or default_filter(config, tied_weight_ids(model))
    targets = [(fqn, m) for fqn, m in model.named_modules()
               if fqn and isinstance(m, (nn.Linear, nn.Embedding)) and keep(m, fqn)]
    for fqn, m in targets:
        try:
            new = handler(m, config)
        except ValueError as e:  # name the layer: "group_size 48 does not divide ..." alone is not enough
            raise ValueError(f"{fqn}: {e}") from None
        _set_module(model, fqn, new)
    return model


def _set_module(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantized_modules(model: nn.Module) -> dict[str, _QuantizedWeight]:
    """Every quantized module by its fully-qualified name."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, _QuantizedWeight)}


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every quantized module by its float equivalent (in place); return the model."""
    for fqn, m in quantized_modules(model).items():
        _set_module(model, fqn, m.to_float())
    return model
