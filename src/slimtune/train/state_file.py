"""Nested training state (optimizer, scheduler, RNG) as one safetensors file: no pickle anywhere.

``torch.save`` of an optimizer state dict is a pickle, and loading a pickle can run code. Here
the tensors go into a safetensors file and the structure around them (dict keys, including the
integer parameter ids of an optimizer state, lists, tuples, numbers, strings, None) into that
file's metadata as JSON: loading it parses JSON and reads tensors, nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_KEY = "slimtune_state"  # the metadata entry holding the structure


class StateFileError(ValueError):
    """A state file is not one :func:`save_state` wrote (or is damaged)."""


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"dict": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return {"list": [_pack(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise StateFileError(f"unexpected node {node!r:.80}")
    (kind, v), = node.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {_unpack(k, tensors): _unpack(x, tensors) for k, x in v}
    if kind == "tuple":
        return tuple(_unpack(x, tensors) for x in v)
    if kind == "list":
        return [_unpack(x, tensors) for x in v]
    if kind == "value":
        return v
    raise StateFileError(f"unknown node kind {kind!r}")


def save_state(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` (nested dicts/lists/tuples of tensors and plain values) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(obj, tensors)
    save_file(tensors, str(path), metadata={_KEY: json.dumps(skeleton)})


def load_state(path: str | os.PathLike) -> Any:
    """Read back what :func:`save_state` wrote (tensors on the CPU)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _KEY not in meta:
            raise StateFileError(f"{path}: not a slimtune state file (no {_KEY} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    try:
        return _unpack(json.loads(meta[_KEY]), tensors)
    except (ValueError, KeyError) as e:
        raise StateFileError(f"{path}: damaged state file ({e})") from None
