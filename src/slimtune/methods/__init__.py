"""Method registry: every fine-tuning / compression method registers itself here by name.

A method is an object following :class:`Method`; the training loop only ever calls these
hooks, so adding a method never touches the loop. Built-in methods live one per module in
this package; every module here is imported on first registry use (keeps ``import slimtune``
lean) and registers itself, so adding a method is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

_REGISTRY: dict[str, Method] = {}
_loaded = False


@dataclass
class MethodContext:
    """What a method may need to know about the run when it is applied."""

    task: str
    """'classification' or 'causal-lm'."""
    total_steps: int
    """Optimizer steps the run will take (AdaLoRA schedules its rank budget on it)."""
    base_model: str
    """Resolved path / hub id of the base model (written into adapter configs)."""


class Method(Protocol):
    """The shape every method has (PEFT's idea: same shape, registered by name)."""

    name: str
    config_cls: type
    defaults: dict[str, Any]
    """The method's own defaults for recipe keys left unset (``train.lr``, ``train.epochs``,
    ``train.min_steps``; see :mod:`slimtune.config.defaults`), e.g. ``{"train.lr": 1e-3}``.
    Optional ``task_defaults = {"causal-lm": {...}}`` overrides them per task."""

    def apply(self, model: torch.nn.Module, cfg: Any, ctx: MethodContext) -> torch.nn.Module:
        """Wrap/modify ``model``; leave exactly the method's parameters trainable."""

    def on_step_end(self, model: torch.nn.Module, cfg: Any, step: int) -> None:
        """Called after every optimizer step, before gradients are zeroed."""

    def export(self, model: torch.nn.Module, cfg: Any, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        """Write ``config.json`` + ``model.safetensors`` (plain transformers) and any extras
        (adapters); return the plain exported model for evaluation."""

    def load_exported(self, path: Path, task: str, dtype: str) -> torch.nn.Module | None:
        """Rebuild a model this method exported in its own format (a folder with a
        ``slimtune_method.json`` sidecar naming the method); None when plain transformers loads
        the folder as it is (every method that exports a plain model)."""


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name`` (later registration of a name is an error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(method_names())}")
    return _REGISTRY[name]


def method_names() -> list[str]:
    """Names of all registered methods."""
    _load_builtins()
    return list(_REGISTRY)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (what a checkpoint must hold), detached copies."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a :func:`trainable_state` back; every trainable parameter must be present."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
