"""On-disk format of a quantized model, and the dequantized export.

A quantized folder holds:

- ``quantized.safetensors``: for every quantized weight ``W`` (e.g.
  ``bert.encoder.layer.0.attention.self.query.weight``) the tensors ``W.qdata``, ``W.scale``,
  ``W.zero_point``, ``W.absmax`` or ``W.codebook`` as its kind needs; every other tensor
  (biases, LayerNorms, skipped layers) as plain float.
- ``quantization.json``: format version, the scheme and its config, and per quantized weight
  its meta (kind, bits, granularity, group/block size, symmetric, shape, dtype) — enough for any
  tool to decode the codes without slimtune (see docs/quantization.md).
- ``config.json`` + tokenizer files, as in any HF folder.

:func:`load_quantized` rebuilds the model with the same quantized modules, bit for bit.
:func:`export_dequantized` writes a plain ``model.safetensors`` folder for stock transformers.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from slimtune.compress.quant.api import (
    QuantizedEmbedding,
    QuantizedLinear,
    _set_module,
    config_to_dict,
    dequantize_,
    quantized_modules,
)
from slimtune.io import atomic_write_json

FORMAT = "slimtune.quantized"
VERSION = 1
WEIGHTS_FILE = "quantized.safetensors"
SIDECAR = "quantization.json"


class QuantizedFormatError(ValueError):
    """A quantized folder is incomplete or inconsistent (the message names file and key)."""


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, config: Any,
                   tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (after :func:`quantize_`) in the compact format; return the folder."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qmods = quantized_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, Any] = {}
    for fqn, m in qmods.items():
        key = f"{fqn}.weight"
        meta = dict(m.qmeta)
        meta["module"] = "embedding" if isinstance(m, QuantizedEmbedding) else "linear"
        if isinstance(m, QuantizedEmbedding) and m.padding_idx is not None:
            meta["padding_idx"] = m.padding_idx
        metas[key] = meta
        for name, t in m.qtensors().items():
            tensors[f"{key}.{name}"] = t.detach().contiguous()
    # Everything else, once (tied tensors: the first name wins, re-tied on load).
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in qmods:
            if name.endswith(".bias"):
                tensors[name] = t.detach().contiguous()
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().clone().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    sidecar = {"format": FORMAT, "version": VERSION, "weights": WEIGHTS_FILE,
               **config_to_dict(config), "tensors": metas, **(extra or {})}
    atomic_write_json(out / SIDECAR, sidecar)
    if hasattr(model, "config"):
        model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_sidecar(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``quantization.json`` of a folder (clear error if missing or foreign)."""
    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        raise QuantizedFormatError(f"{path}: not found; is {model_dir} a slimtune quantized folder?")
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QuantizedFormatError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if side.get("format") != FORMAT:
        raise QuantizedFormatError(f"{path}: format is {side.get('format')!r}, expected {FORMAT!r}")
    if side.get("version", 0) > VERSION:
        raise QuantizedFormatError(f"{path}: version {side['version']} is newer than this slimtune reads ({VERSION})")
    return side


def _build_skeleton(model_dir: Path) -> nn.Module:

    cfg = AutoConfig.from_pretrained(model_dir)
    archs = getattr(cfg, "architectures", None) or []
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModelForSequenceClassification
    return auto.from_config(cfg, dtype=torch.float32)


def load_quantized(model_dir: str | os.PathLike, dequantize: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`, with identical codes and outputs.

    Args:
        model_dir: folder with quantization.json, quantized.safetensors and config.json.
        dequantize: return plain float modules instead of quantized ones (faster forward).
    """

    d = Path(model_dir)
    side = read_sidecar(d)
    wpath = d / side.get("weights", WEIGHTS_FILE)
    if not wpath.is_file():
        raise QuantizedFormatError(f"{wpath}: not found (named by {d / SIDECAR})")
    tensors = load_file(str(wpath))
    model = _build_skeleton(d).eval()
    for key, meta in side["tensors"].items():
        fqn = key.removesuffix(".weight")
        names = [n for n in tensors if n.startswith(key + ".")]
        if not names:
            raise QuantizedFormatError(f"{wpath}: no tensors for {key} (listed in {SIDECAR})")
        parts = {n[len(key) + 1:]: tensors.pop(n) for n in names}
        try:
            model.get_submodule(fqn)
        except AttributeError:
            raise QuantizedFormatError(f"{d / SIDECAR}: tensor {key} names no module of the model") from None
        if meta.get("module") == "embedding":
            new: nn.Module = QuantizedEmbedding(meta, parts, meta.get("padding_idx"))
        else:
            new = QuantizedLinear(meta, parts, tensors.pop(f"{fqn}.bias", None))
        _set_module(model, fqn, new)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    qbufs = {f"{fqn}.{b}" for fqn, m in quantized_modules(model).items()
             for b in [*m.qnames, "bias"]}
    missing = [k for k in missing if k not in qbufs]
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if unexpected:
        raise QuantizedFormatError(f"{wpath}: unexpected tensors {unexpected[:3]}")
    missing = [k for k in missing if not _is_tied_alias(model, k, tensors)]
    if missing:
        raise QuantizedFormatError(f"{wpath}: missing tensors {missing[:3]}")
    return dequantize_(model) if dequantize else model


def _is_tied_alias(model: nn.Module, key: str, loaded: dict[str, torch.Tensor]) -> bool:
    """True if ``key`` is a parameter sharing storage with one that was loaded (tied weights)."""
    sd = model.state_dict(keep_vars=True)
    t = sd.get(key)
    if t is None:
        return False
    return any(n != key and n in loaded and sd[n] is t for n in sd)


def export_dequantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a plain HF folder (float ``model.safetensors``) with the quantized model's weights
    decoded: what stock ``transformers`` loads to reproduce the quantized model's outputs."""

    out = Path(out_dir)
    plain = dequantize_(copy.deepcopy(model))
    plain.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
