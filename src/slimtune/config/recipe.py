"""Typed recipes: one dataclass per section, strict YAML loading, ``key.path=value`` overrides.

A recipe is validated completely (unknown keys, types, choices, ranges, files) before any
weight is loaded; ``slimtune validate recipe.yaml`` runs exactly that check. The resolved
recipe is written as ``recipe.yaml`` beside every artifact, so a run can be repeated from it.

Every field carries its help text in ``metadata["help"]``; ``slimtune finetune --help`` lists
them all, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class RecipeError(ValueError):
    """A recipe (YAML file, CLI flag or override) is invalid; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by ``--help`` and in the docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which pretrained model to start from and what head to put on it."""

    name: str = _f("minilm", "Local path, hub id, or alias: 'minilm' (packaged MiniLM-L6), 'minilm-l3' (packaged 3-layer paraphrase-MiniLM-L3-v2), 'smollm2' (packaged SmolLM2-135M).")
    task: Literal["classification", "causal-lm"] = _f("classification", "Task: sequence classification (single texts or pairs) or causal language modelling.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Dtype the weights are loaded in (training math precision is train.precision).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~30% more compute.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model folder (off: never run downloaded code).")


@dataclass
class DataConfig:
    """Where the data is and how to read it."""

    train: str | None = _f(None, "Training file: CSV, TSV or JSONL (classification) or raw .txt (causal-lm).")
    eval: str | None = _f(None, "Evaluation file, same format as train. causal-lm without one holds out data.eval_fraction of train.")
    text_column: str | None = _f(None, "Column with the text. Auto-detected: text, sentence, sentence1, #1 String, ...")
    text_pair_column: str | None = _f(None, "Column with the second text of a pair. Auto-detected: sentence2, #2 String, ...")
    label_column: str | None = _f(None, "Column with the label (string or integer). Auto-detected: label, labels, Quality, ...")
    max_length: int = _f(128, "Maximum tokens per example (causal-lm: block size).")
    max_train_samples: int | None = _f(None, "Use only the first N training rows after a seeded shuffle (None: all).")
    max_eval_samples: int | None = _f(None, "Use only the first N evaluation rows (None: all).")
    skip_bad_rows: bool = _f(False, "Skip malformed rows and report how many were skipped, instead of stopping at the first.")
    eval_fraction: float = _f(0.05, "causal-lm only: fraction of the training text held out when no eval file is given.")
    group_by_length: bool = _f(True, "Batch examples of similar length together (less padding, same randomness across epochs).")
    encoding: str = _f("utf-8", "Text encoding of the data files (e.g. latin-1).")


@dataclass
class TrainConfig:
    """The one training loop's settings (shared by every method)."""

    epochs: float = _f(3.0, "Passes over the training data (fractional allowed). Ignored when max_steps > 0.")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 derives them from epochs.")
    batch_size: int = _f(32, "Examples per micro-batch; with several processes the global micro-batch, split across them.")
    eval_batch_size: int = _f(64, "Examples per evaluation batch.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum).")
    lr: float = _f(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    warmup_ratio: float = _f(0.06, "Fraction of steps with linear warm-up from 0 to lr.")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "Decay after warm-up.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value (0 disables clipping).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "Autocast precision. auto: bf16 on GPUs that support it, fp32 on CPU (CPU bf16 is slower without AMX).")
    eval_every: int = _f(0, "Evaluate every N optimizer steps (0: at the end of every epoch).")
    save_every: int = _f(0, "Write a resumable checkpoint every N optimizer steps (0: at every evaluation).")
    keep_checkpoints: int = _f(1, "Resumable checkpoints kept on disk (the best model is kept separately).")
    early_stopping_patience: int = _f(0, "Stop after this many evaluations without improvement (0: never).")
    metric: str = _f("auto", "Metric that picks the best checkpoint: accuracy, macro_f1, loss (auto: accuracy, or loss for causal-lm).")
    seed: int = _f(42, "Seed for shuffling, dropout and initialisation; the same seed gives the same run.")
    num_threads: int = _f(0, "CPU threads for torch (0: torch's default).")
    log_every: int = _f(10, "Log loss and learning rate every N optimizer steps.")
    resume: bool = _f(True, "Resume from the newest checkpoint in the output directory if one exists.")
    tensorboard: bool = _f(True, "Also write TensorBoard logs (when tensorboard is installed).")
    progress: bool = _f(True, "Show a progress bar (on a terminal).")
    fsdp: bool = _f(False, "With several processes (--nproc / torchrun): shard weights, gradients and optimizer state (FSDP2 FULL_SHARD) instead of replicating them (DDP). For models that do not fit one device.")
    ddp_find_unused_parameters: bool = _f(False, "DDP: tolerate trainable parameters that get no gradient in a step (slower; needed only by models with unused trainable weights).")


@dataclass
class Recipe:
    """A whole run. ``method`` holds the config dataclass of the method named by ``method.name``."""

    output: str | None = _f(None, "Output directory; everything the run writes goes here.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None  # filled by resolve(): an instance of the method's registered config class
    method_name: str = "full"  # saved as method.name
    # ``slimtune distill`` recipes only: a slimtune.compress.distill.recipe.DistillConfig (None: no such section)
    distill: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe), the form saved as ``recipe.yaml``."""
        out = {"output": self.output}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["method"] = {"name": self.method_name, **(dataclasses.asdict(self.method) if self.method else {})}
        if self.distill is not None:
            out["distill"] = dataclasses.asdict(self.distill)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the fully resolved recipe as YAML (atomically)."""
        from slimtune.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# --------------------------------------------------------------------------------------------
# Type checking and coercion
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a RecipeError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise RecipeError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    return value


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, rejecting unknown keys with the valid list."""
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise RecipeError(
            f"unknown key '{prefix}.{unknown[0]}'; valid keys of '{prefix}': {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file with ``yaml.safe_load``; errors name the file (and line for syntax)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise RecipeError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so ``true``, ``3``, ``[q,v]`` work)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating intermediate mappings."""
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither input is modified)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    """Turn a nested dict (YAML + flags + overrides) into a validated :class:`Recipe`."""
    from slimtune.methods import get_method, method_names

    valid_top = ["output", *SECTIONS, "method", "distill"]  # distill: optional, slimtune distill only
    for k in tree:
        if k not in valid_top:
            raise RecipeError(f"{source}: unknown section '{k}'; valid sections: {', '.join(valid_top)}")
    recipe = Recipe(output=_coerce(tree.get("output"), str | None, "output"))
    for name, cls in SECTIONS.items():
        setattr(recipe, name, build_section(cls, tree.get(name) or {}, name))
    mtree = dict(tree.get("method") or {"name": "full"})
    mname = mtree.pop("name", "full")
    if mname not in method_names():
        raise RecipeError(f"method.name: unknown method {mname!r}; registered: {', '.join(method_names())}")
    mcfg = build_section(get_method(mname).config_cls, mtree, "method")
    recipe.method = mcfg
    recipe.method_name = mname
    if "distill" in tree:  # written by slimtune distill beside its student; validated below
        from slimtune.compress.distill.recipe import DistillConfig

        recipe.distill = build_section(DistillConfig, tree["distill"] or {}, "distill")
    validate(recipe)
    return recipe


def validate(recipe: Recipe, check_files: bool = True) -> None:
    """Check ranges, cross-field rules and that input files exist. Loads no weights."""
    t, d, m = recipe.train, recipe.data, recipe.model
    positive = {"train.batch_size": t.batch_size, "train.eval_batch_size": t.eval_batch_size,
                "train.grad_accum": t.grad_accum, "data.max_length": d.max_length,
                "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints}
    for k, v in positive.items():
        if v < 1:
            raise RecipeError(f"{k}: must be >= 1, got {v}")
    if t.lr <= 0:
        raise RecipeError(f"train.lr: must be > 0, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        raise RecipeError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.max_steps == 0 or t.max_steps < -1:
        raise RecipeError(f"train.max_steps: must be -1 (from epochs) or >= 1, got {t.max_steps}")
    if t.max_steps == -1 and t.epochs <= 0:
        raise RecipeError(f"train.epochs: must be > 0, got {t.epochs}")
    if t.metric not in ("auto", "accuracy", "macro_f1", "loss"):
        raise RecipeError(f"train.metric: {t.metric!r} is not one of ['auto', 'accuracy', 'macro_f1', 'loss']")
    if m.task == "causal-lm" and t.metric in ("accuracy", "macro_f1"):
        raise RecipeError(f"train.metric: {t.metric!r} needs labels; causal-lm uses 'loss'")
    if not 0 < d.eval_fraction < 1:
        raise RecipeError(f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")
    if check_files:
        for key, path in (("data.train", d.train), ("data.eval", d.eval)):
            if path is not None and not Path(path).is_file():
                raise RecipeError(f"{key}: file not found: {path}")
    check = getattr(recipe.method, "validate", None)
    if check is not None:
        check(recipe)
    if recipe.distill is not None:
        recipe.distill.validate(recipe)


def field_help() -> list[tuple[str, str, str]]:
    """(key, default, help) for every recipe field, methods included: the ``--help`` listing."""
    from slimtune.methods import get_method, method_names

    rows: list[tuple[str, str, str]] = [("output", "None", Recipe.__dataclass_fields__["output"].metadata["help"])]
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{sec}.{f.name}", repr(default), f.metadata.get("help", "")))
    rows.append(("method.name", "'full'", f"Method: {', '.join(method_names())}."))
    for name in method_names():
        for f in dataclasses.fields(get_method(name).config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"method.{f.name}  [{name}]", repr(default), f.metadata.get("help", "")))
    return rows
