"""AdaLoRA (Zhang et al., 2023) through PEFT, with the schedule wired to the run.

AdaLoRA starts every adapted layer at rank ``init_r`` and, while training, moves a total rank
budget of ``target_r * n_layers`` to the layers whose singular triplets matter most. PEFT
leaves three things to the user that are easy to get wrong (huggingface/peft #432, #1801,
#1327); here they are handled once:

- ``total_step`` comes from the run (``MethodContext.total_steps``), never hand-typed;
- ``tinit``/``tfinal`` default to 10% / 20% of the run and are checked against it, so a short
  run gets a valid schedule instead of PEFT's "don't allow for a budgeting phase" error;
- ``update_and_allocate(step)`` is called from ``on_step_end``, which the loop runs after the
  optimizer step and before ``zero_grad`` (the importance scores need the gradients).

Export is the LoRA export (merged plain model + PEFT adapter under ``adapter/``, the adapter
resized to the final rank pattern by PEFT), plus ``adalora_ranks.json``: the final rank of
every adapted layer.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.config.fields import RecipeError, setting
from slimtune.methods import MethodContext, register_method
from slimtune.methods._peft import default_target_modules, export_peft, peft_task_type


@dataclass
class AdaLoraMethodConfig:
    """AdaLoRA (adaptive rank budget) via PEFT."""

    init_r: int = setting(12, "adalora: rank every adapted layer starts with.", ge=1)
    target_r: int = setting(8, "adalora: average final rank; the total budget target_r * n_layers is redistributed across layers.", ge=1)
    alpha: float = setting(32.0, "adalora: scaling numerator (update scaled by alpha / init_r).", gt=0)
    dropout: float = setting(0.05, "adalora: dropout on the adapter input.", ge=0, lt=1)
    tinit: int | None = setting(None, "adalora: steps before the rank budget starts shrinking (None: 10% of the run).", ge=0)
    tfinal: int | None = setting(None, "adalora: last steps trained with the final ranks fixed (None: 20% of the run).", ge=0)
    delta_t: int = setting(1, "adalora: re-allocate ranks every N steps during the budgeting phase.", ge=1)
    beta1: float = setting(0.85, "adalora: EMA factor of the importance (sensitivity) scores.", ge=0, lt=1)
    beta2: float = setting(0.85, "adalora: EMA factor of their uncertainty.", ge=0, lt=1)
    orth_reg_weight: float = setting(0.5, "adalora: weight of the orthogonality regulariser on P and Q.", ge=0)
    target_modules: list[str] | None = setting(None, "adalora: module names to adapt; None: every linear layer of the transformer blocks.")
    export: Literal["both", "merged", "adapter"] = setting("both", "adalora: what to write: merged model, PEFT adapter under adapter/, or both.")

    def validate(self, recipe: Any) -> None:
        if not 1 <= self.target_r < self.init_r:
            # target_r == init_r would ask PEFT to mask 0 triplets (torch.kthvalue(k=0) fails).
            raise RecipeError(f"method.target_r: must be in [1, init_r={self.init_r}), got {self.target_r}")
        steps = getattr(getattr(recipe, "train", None), "max_steps", -1)
        if steps > 0:  # with epochs the step count is known only after reading the data
            schedule(self, steps)


def schedule(cfg: AdaLoraMethodConfig, total_steps: int) -> tuple[int, int]:
    """``(tinit, tfinal)`` for a run of ``total_steps``, leaving >= 1 budgeting step.

    Raises RecipeError (naming the keys and the step count) when explicit values leave no
    budgeting phase; the derived defaults (10% / 20%) always leave one.
    """

    tinit = cfg.tinit if cfg.tinit is not None else int(0.1 * total_steps)
    tfinal = cfg.tfinal if cfg.tfinal is not None else int(0.2 * total_steps)
    if tinit < 0 or tfinal < 0:
        raise RecipeError(f"method.tinit/method.tfinal: must be >= 0, got {tinit}/{tfinal}")
    if tinit >= total_steps - tfinal:
        raise RecipeError(
            f"method.tinit={tinit} + method.tfinal={tfinal} leave no budgeting phase in a run of "
            f"{total_steps} steps (need tinit + tfinal < steps); lower them or leave them unset "
            f"(10% / 20% of the run)")
    return tinit, tfinal


def layer_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Current rank of every AdaLoRA layer: the number of non-zero singular values ``lora_E``.

    Keys are module paths without PEFT's wrapper prefix (``bert.encoder.layer.0.attention.self.query``).
    """
    ranks: dict[str, int] = {}
    for name, mod in model.named_modules():
        e = getattr(mod, "lora_E", None)
        if isinstance(e, torch.nn.ParameterDict) and "default" in e:
            key = name.removeprefix("base_model.model.")
            ranks[key] = int((e["default"].detach() != 0).sum())
    return ranks


def _block_linears(model: torch.nn.Module) -> list[str]:
    """Full names of the linear layers inside numbered transformer blocks (the rank budget's
    domain: embeddings-side or head-side linears outside blocks are left alone)."""
    every = default_target_modules(model)
    blocks = re.compile(r"\.\d+\.")  # inside a numbered block: encoder.layer.3. / layers.3.
    return [n for n in every if blocks.search(n)] or every


def _by_layer(ranks: dict[str, int]) -> dict[str, dict[str, int]]:
    """Group ``{module path: rank}`` by transformer block: ``{"layer 0": {"attention.self.query": 5}}``."""
    rows: dict[str, dict[str, int]] = {}
    for name, r in ranks.items():
        m = re.search(r"\.(\d+)\.", name)
        layer, rest = (f"layer {m.group(1)}", name[m.end():]) if m else ("other", name)
        rows.setdefault(layer, {})[rest] = r
    return rows


def _pattern_from_masks(model: torch.nn.Module) -> dict[str, list[bool]]:
    """Rebuild PEFT's ``rank_pattern`` from the zeroed ``lora_E`` entries (after a resume)."""
    inner = model.base_model.model  # type: ignore[union-attr]
    return {n: (p.detach() != 0).view(-1).tolist() for n, p in inner.named_parameters()
            if "lora_E.default" in n}


class AdaLoraMethod:
    # AdaLoRA's update is a product of three small factors (E starts at 0): at 1e-3 it barely
    # moves in 125 steps (0.51 on SST-2), 5e-3 trains (0.82; bench/results/peft_methods.json).
    defaults = {"train.lr": 5e-3, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.lr": 1e-3, "train.min_steps": 0}}  # not measured on decoders: LoRA-like
    name = "adalora"
    config_cls = AdaLoraMethodConfig

    def apply(self, model: torch.nn.Module, cfg: AdaLoraMethodConfig, ctx: MethodContext) -> torch.nn.Module:
        from peft import AdaLoraConfig, get_peft_model  # optional dependency (the peft extra)

        tinit, tfinal = schedule(cfg, ctx.total_steps)
        config = AdaLoraConfig(
            task_type=peft_task_type(ctx.task),
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=cfg.delta_t,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=ctx.total_steps,
            target_modules=cfg.target_modules or _block_linears(model),
            base_model_name_or_path=ctx.base_model,
        )
        return get_peft_model(model, config)

    def on_step_end(self, model: torch.nn.Module, cfg: AdaLoraMethodConfig, step: int) -> None:
        inner = model.base_model  # type: ignore[union-attr]  # the AdaLoraModel
        pc = inner.peft_config["default"]
        if step > pc.total_step - pc.tfinal and pc.rank_pattern is None:
            # Resumed inside the final phase: the allocator's state is gone, but the final
            # masks are in the restored lora_E weights (checkpoints are written after masking).
            pc.rank_pattern = _pattern_from_masks(model)
        # Steps are 1-based here; PEFT finalises the pattern at step == total_step - tfinal.
        inner.update_and_allocate(step)

    def export(self, model: torch.nn.Module, cfg: AdaLoraMethodConfig, out_dir: Path, ctx: MethodContext) -> torch.nn.Module:
        ranks = layer_ranks(model)
        summary = {"init_r": cfg.init_r, "target_r": cfg.target_r,
                   "budget": cfg.target_r * len(ranks), "total_rank": sum(ranks.values()),
                   "layers": ranks}
        (out_dir / "adalora_ranks.json").write_text(json.dumps(summary, indent=1))
        # The entry point talks: a compact per-layer view (rank per adapted module, by layer).
        print(f"[slimtune] adalora final ranks (init {cfg.init_r}, target mean {cfg.target_r}, "
              f"total {summary['total_rank']}/{summary['budget']}):", file=sys.stderr)
        for layer, row in _by_layer(ranks).items():
            print(f"[slimtune]   {layer}: " + " ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
        return export_peft(model, out_dir, cfg.export, ctx.base_model)

    def load_exported(self, path: Path, task: str, dtype: str) -> None:
        """None: the export is a plain transformers folder."""
        return None


register_method(AdaLoraMethod())
