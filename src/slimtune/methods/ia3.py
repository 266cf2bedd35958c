"""(IA)^3 (Liu et al., 2022) through PEFT: learned vectors that rescale keys, values and the FFN.

Each adapted layer gets one vector, initialised to ones (so the model is unchanged at the
start): attention key/value outputs are scaled per output feature, and the FFN's second
linear per *input* feature (the scaled intermediate activation of the paper). That is ~0.1%
of the parameters of LoRA r=16. Modules are picked per architecture (PEFT's table for known
model types, name rules otherwise); the task head trains in full. Export is the LoRA export:
the merged plain model plus the PEFT adapter under ``adapter/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.config.fields import RecipeError, setting
from slimtune.methods import MethodContext, register_method
from slimtune.methods._peft import export_peft, peft_task_type

# Fallback when PEFT has no entry for the model type: last name components.
_KV_NAMES = ("key", "value", "k_proj", "v_proj", "k_lin", "v_lin", "key_proj", "value_proj")
_FFN_OUT_NAMES = ("down_proj", "fc2", "lin2", "dense_4h_to_h", "w2")


@dataclass
class IA3MethodConfig:
    """(IA)^3 via PEFT."""

    target_modules: list[str] | None = setting(None, "ia3: modules to rescale; None: keys, values and the FFN output layer (per architecture).")
    feedforward_modules: list[str] | None = setting(None, "ia3: which of target_modules are FFN layers (scaled on their input); None: detected with target_modules.")
    export: Literal["both", "merged", "adapter"] = setting("both", "ia3: what to write: merged model, PEFT adapter under adapter/, or both.")

    def validate(self, recipe: Any) -> None:

        if self.feedforward_modules and not self.target_modules:
            raise RecipeError("method.feedforward_modules: set method.target_modules too (feed-forward modules must be a subset of them)")
        if self.feedforward_modules and self.target_modules:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise RecipeError(f"method.feedforward_modules: {extra} are not in method.target_modules")


def ia3_modules(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` for ``model``.

    PEFT's per-model-type table first (bert: key, value, output.dense; llama: k_proj, v_proj,
    down_proj); else linear layers named like keys/values/FFN-output. Raises ValueError for a
    model where neither finds anything.
    """
    from peft.utils.constants import (  # optional dependency (the peft extra)
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (  # optional dependency (the peft extra)
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGETS and model_type in FF:
        return list(TARGETS[model_type]), list(FF[model_type])
    found = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [n for n in _KV_NAMES if n in found]
    ff = [n for n in _FFN_OUT_NAMES if n in found]
    if not targets and not ff:
        raise ValueError(f"ia3: no key/value/FFN-output linear layers found in {type(model).__name__} "
                         f"(model_type {model_type!r}); set method.target_modules and method.feedforward_modules")
    return targets + ff, ff


class IA3Method:
    # IA3 learns only rescaling vectors (starting at 1): it needs a much higher rate *and* more
    # steps (T-Few: 3e-3 for 1,000 steps; SST-2 here: nothing learned at 3e-3 in 63 steps,
    # 0.76 at 5e-3 in 125 steps).
    defaults = {"train.lr": 1e-2, "train.epochs": 3.0, "train.min_steps": 600}
    task_defaults = {"causal-lm": {"train.lr": 3e-3, "train.min_steps": 0}}  # T-Few's rate for decoders
    name = "ia3"
    config_cls = IA3MethodConfig

    def apply(self, model: torch.nn.Module, cfg: IA3MethodConfig, ctx: MethodContext) -> torch.nn.Module:
        from peft import IA3Config, get_peft_model  # optional dependency (the peft extra)

        if cfg.target_modules:
            targets, ff = cfg.target_modules, cfg.feedforward_modules or []
        else:
            targets, ff = ia3_modules(model)
        config = IA3Config(task_type=peft_task_type(ctx.task), target_modules=targets,
                           feedforward_modules=ff, base_model_name_or_path=ctx.base_model)
        return get_peft_model(model, config)

    def on_step_end(self, model: torch.nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: torch.nn.Module, cfg: IA3MethodConfig, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        return export_peft(model, out_dir, cfg.export, ctx.base_model)

    def load_exported(self, path: Path, task: str, dtype: str) -> None:
        """None: the export is a plain transformers folder."""
        return None


register_method(IA3Method())
