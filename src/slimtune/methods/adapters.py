"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021), which PEFT lacks (peft #244).

An adapter is ``x + up(act(down(x)))`` with ``down: H -> size`` and ``up: size -> H``. ``up``
starts at zero, so at initialisation every adapter is the identity and the model computes
exactly what the base model does. Adapters sit on the output projection of a sublayer, before
the residual add (and, in BERT, before the LayerNorm):

- ``placement: both``      after attention and after the FFN (Houlsby),
- ``placement: ffn``       after the FFN only (Pfeiffer),
- ``placement: attention`` after attention only.

They are attached as a child module ``adapter`` of the output projection (BERT
``attention.output.dense`` / ``output.dense``, Llama ``self_attn.o_proj`` / ``mlp.down_proj``,
...) plus a forward hook, so the base weights keep their names. The task head
(``classifier``/``score``) trains in full; everything else is frozen.

Serving. The non-linearity makes folding into the base weights impossible, so there is no plain
``model.safetensors``. Export writes:

- ``adapters/adapter_model.safetensors`` + ``adapters/adapter_config.json``: the adapters and
  the trained head only (what must be stored next to the base model), loaded by
  :func:`load_adapters` (``load_adapters(base_model, DIR/adapters)``);
- ``model_with_adapters.safetensors`` + ``config.json`` + ``slimtune_method.json``: the whole
  model, so ``slimtune evaluate --model DIR`` and ``slimtune.models.loading.load_model(DIR, task)`` load
  it without the base model (``export: adapter`` skips this copy; the base is then read from
  the path in ``adapter_config.json``). Plain ``transformers`` refuses the folder (no
  ``model.safetensors``) instead of silently dropping the adapters.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from slimtune.config.fields import RecipeError, setting
from slimtune.methods import MethodContext, register_method
from slimtune.models.loading import weights_kwargs

# Output projections of the attention / FFN sublayers, per architecture family (regular
# expressions searched in full module names).
ATTENTION_OUTPUTS = (
    r"\.\d+\.attention\.output\.dense$",  # BERT, RoBERTa, ELECTRA, MiniLM, XLM-R
    r"\.self_attn\.o_proj$",  # Llama, Mistral, Qwen2, Gemma, SmolLM
    r"\.attention\.out_lin$",  # DistilBERT
    r"\.self_attn\.out_proj$",  # OPT, BART
    r"\.attn\.c_proj$",  # GPT-2
    r"\.attention\.attn\.o$",  # MPNet
)
FFN_OUTPUTS = (
    r"\.\d+\.output\.dense$",  # BERT family (the layer's own output, not attention.output)
    r"\.mlp\.down_proj$",  # Llama family
    r"\.ffn\.lin2$",  # DistilBERT
    r"\.mlp\.c_proj$",  # GPT-2
    r"\.fc2$",  # OPT, BART
    r"\.mlp\.dense_4h_to_h$",  # GPT-NeoX
)
HEAD_NAMES = ("classifier", "score")
WEIGHTS_NAME = "model_with_adapters.safetensors"
ADAPTER_DIR = "adapters"


@dataclass
class AdapterMethodConfig:
    """Bottleneck adapters (Houlsby / Pfeiffer)."""

    size: int = setting(64, "adapters: bottleneck dimension (the adapter's hidden size).", ge=1)
    placement: Literal["both", "attention", "ffn"] = setting("both", "adapters: after attention and FFN (both = Houlsby), FFN only (= Pfeiffer) or attention only.")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = setting("relu", "adapters: activation between the down and up projections.")
    train_norms: bool = setting(False, "adapters: also train the LayerNorm/RMSNorm weights (Houlsby did).")
    attention_modules: list[str] | None = setting(None, "adapters: regexes for the attention output projections (None: known architectures).")
    ffn_modules: list[str] | None = setting(None, "adapters: regexes for the FFN output projections (None: known architectures).")
    export: Literal["both", "adapter"] = setting("both", "adapters: adapter folder only, or also the whole model (loadable without the base).")

    def validate(self, recipe: Any) -> None:
        for key in ("attention_modules", "ffn_modules"):
            for pat in getattr(self, key) or []:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise RecipeError(f"method.{key}: {pat!r} is not a regular expression ({e})") from None


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """``x + up(act(down(x)))``; ``up`` is zero at init, so the adapter starts as the identity."""

    def __init__(self, hidden: int, size: int, non_linearity: str = "relu"):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)  # near-identity init (Houlsby §2.1)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, H)
        return x + self.up(self.act(self.down(x)))


def _adapter_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    # A module-level function that looks the adapter up on the module: deepcopy-safe.
    return module.adapter(output)


def find_targets(model: nn.Module, placement: str, attention_modules: list[str] | None = None,
                 ffn_modules: list[str] | None = None) -> dict[str, list[str]]:
    """Module names to put adapters on: ``{"attention": [...], "ffn": [...]}`` by placement.

    Raises ValueError naming the model class and the patterns tried when a requested
    placement finds nothing (unknown architecture: pass the patterns in the method config).
    """
    names = [n for n, _ in model.named_modules()]
    wanted = {"attention": placement in ("both", "attention"), "ffn": placement in ("both", "ffn")}
    patterns = {"attention": attention_modules or list(ATTENTION_OUTPUTS),
                "ffn": ffn_modules or list(FFN_OUTPUTS)}
    out: dict[str, list[str]] = {}
    for kind, want in wanted.items():
        if not want:
            continue
        found = [n for n in names if any(re.search(p, n) for p in patterns[kind])]
        if not found:
            raise ValueError(
                f"adapters: no {kind} output projection found in {type(model).__name__} "
                f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}); "
                f"tried {patterns[kind]}; set method.{kind}_modules to regexes of module names")
        out[kind] = found
    return out


def _out_features(mod: nn.Module, name: str) -> int:
    n = getattr(mod, "out_features", None) or getattr(mod, "nf", None)  # nn.Linear / GPT-2 Conv1D
    if not isinstance(n, int):
        raise ValueError(f"adapters: {name} ({type(mod).__name__}) has no out_features; cannot size an adapter")
    return n


def attach_adapters(model: nn.Module, targets: dict[str, list[str]], size: int,
                    non_linearity: str = "relu") -> nn.Module:
    """Add a :class:`Bottleneck` after each module in ``targets`` (in place); return ``model``."""
    for names in targets.values():
        for name in names:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapters: the model has no module {name!r}") from None
            if hasattr(mod, "adapter"):
                raise ValueError(f"adapters: {name} already has an adapter")
            w = next(mod.parameters())
            mod.add_module("adapter", Bottleneck(_out_features(mod, name), size, non_linearity).to(w.device, w.dtype))
            mod.register_forward_hook(_adapter_hook)
    return model


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm"))


def set_trainable(model: nn.Module, task: str, train_norms: bool) -> None:
    """Freeze everything but adapters, the classification head and (optionally) norms."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in model.named_modules():
        last = name.split(".")[-1]
        if isinstance(mod, Bottleneck) or (task == "classification" and last in HEAD_NAMES) \
                or (train_norms and _is_norm(mod)):
            for p in mod.parameters():
                p.requires_grad_(True)


def save_adapters(model: nn.Module, out_dir: Path, info: dict[str, Any]) -> None:
    """Write the trainable tensors (adapters, head, norms) and ``adapter_config.json``."""

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(info, indent=1))


def load_adapters(base_model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Attach the adapters saved in ``adapter_dir`` to ``base_model`` and load their weights.

    ``base_model`` is the model the adapters were trained on, loaded as usual (e.g.
    ``slimtune.models.loading.load_model(base, "classification", label_names=[...])``); the saved
    head and norms overwrite its own. Every adapter tensor must be in the file.
    """

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (not a slimtune adapters folder)")
    info = json.loads(cfg_path.read_text())
    if info.get("slimtune_method") != "adapters":
        raise ValueError(f"{cfg_path}: not a slimtune bottleneck-adapter config")
    attach_adapters(base_model, info["targets"], info["size"], info["non_linearity"])
    state = load_file(str(d / "adapter_model.safetensors"))
    params = dict(base_model.named_parameters())
    missing = [n for n in params if ".adapter." in n and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise KeyError(f"{d}: adapter weights do not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{d}: {n} has shape {tuple(t.shape)} in the file, {tuple(params[n].shape)} in the model")
            params[n].copy_(t)
    set_trainable(base_model, info.get("task", "classification"), bool(info.get("train_norms")))
    return base_model


def load_exported(path: Path, task: str, dtype: str = "float32") -> nn.Module:
    """Load an exported adapters run folder (called by ``slimtune.models.loading.load_model``)."""

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(path)
    full = path / WEIGHTS_NAME
    if full.is_file():
        model = auto.from_config(config, dtype=getattr(torch, dtype))
        info = json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())
        attach_adapters(model, info["targets"], info["size"], info["non_linearity"])
        load_model(model, str(full), strict=True)
    else:  # adapter-only export: the base model from the path recorded at training time
        info = json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())
        base = info["base_model_name_or_path"]
        model = auto.from_pretrained(base, config=config, dtype=getattr(torch, dtype), **weights_kwargs(base))
        load_adapters(model, path / ADAPTER_DIR)
    model.eval()
    return model


class AdapterMethod:
    # Bottleneck adapters start near identity (small up-projection): 1e-3 (Houlsby et al. swept
    # 3e-5..3e-3; SST-2 here: 0.80 at 1e-3 after 125 steps).
    defaults = {"train.lr": 1e-3, "train.epochs": 3.0, "train.min_steps": 400}
    task_defaults = {"causal-lm": {"train.min_steps": 0}}
    name = "adapters"
    config_cls = AdapterMethodConfig
    load_exported = staticmethod(load_exported)  # used by slimtune.models.loading.load_model

    def apply(self, model: nn.Module, cfg: AdapterMethodConfig, ctx: MethodContext) -> nn.Module:
        targets = find_targets(model, cfg.placement, cfg.attention_modules, cfg.ffn_modules)
        attach_adapters(model, targets, cfg.size, cfg.non_linearity)
        set_trainable(model, ctx.task, cfg.train_norms)
        model._slimtune_adapter_targets = targets  # read back by export
        return model

    def on_step_end(self, model: nn.Module, cfg: Any, step: int) -> None:
        pass

    def export(self, model: nn.Module, cfg: AdapterMethodConfig, out_dir: Path, ctx: MethodContext) -> nn.Module:

        info = {"slimtune_method": "adapters", "format_version": 1,
                "base_model_name_or_path": ctx.base_model, "task": ctx.task,
                "targets": model._slimtune_adapter_targets,
                **{k: v for k, v in asdict(cfg).items() if k in ("size", "placement", "non_linearity", "train_norms")}}
        save_adapters(model, out_dir / ADAPTER_DIR, info)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out_dir)  # labels + architecture, read by evaluate/load_exported
        weights = None
        if cfg.export == "both":
            save_model(model, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})  # tied tensors once
            weights = WEIGHTS_NAME
        (out_dir / "slimtune_method.json").write_text(json.dumps(
            {"method": self.name, "weights": weights, "adapters": ADAPTER_DIR}, indent=1))
        return model


register_method(AdapterMethod())
