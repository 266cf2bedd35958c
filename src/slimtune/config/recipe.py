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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slimtune.compress.distill.settings import DistillConfig
from slimtune.config.defaults import apply_method_defaults
from slimtune.config.fields import (  # noqa: F401 (load_yaml ... deep_merge: re-exported, the recipe API)
    RecipeError,
    build_section,
    check_ranges,
    coerce,
    deep_merge,
    load_yaml,
    parse_override,
    set_path,
    setting,
)
from slimtune.io import atomic_write_text

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which pretrained model to start from and what head to put on it."""

    name: str = setting("minilm", "Local path, hub id, or alias: 'minilm' (packaged MiniLM-L6), 'minilm-l3' (packaged 3-layer paraphrase-MiniLM-L3-v2), 'smollm2' (packaged SmolLM2-135M).", flag="--model")
    task: Literal["classification", "causal-lm"] = setting("classification", "Task: sequence classification (single texts or pairs) or causal language modelling.")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "Dtype the weights are loaded in (training math precision is train.precision).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass: less memory, ~30% more compute.")
    trust_remote_code: bool = setting(False, "Allow custom modelling code from the model folder (off: never run downloaded code).")


@dataclass
class DataConfig:
    """Where the data is and how to read it."""

    train: str | None = setting(None, "Training file: CSV, TSV or JSONL (classification) or raw .txt (causal-lm).")
    eval: str | None = setting(None, "Evaluation file, same format as train. causal-lm without one holds out data.eval_fraction of train.")
    text_column: str | None = setting(None, "Column with the text. Auto-detected: text, sentence, sentence1, #1 String, ...")
    text_pair_column: str | None = setting(None, "Column with the second text of a pair. Auto-detected: sentence2, #2 String, ...")
    label_column: str | None = setting(None, "Column with the label (string or integer). Auto-detected: label, labels, Quality, ...")
    max_length: int | Literal["auto"] = setting("auto", "Maximum tokens per example (causal-lm: block size). auto (classification): the 99th percentile of the train (and eval) files' token lengths, rounded up to a multiple of 8, capped by the model's positions; causal-lm: 128. The value used is saved in recipe.yaml (provenance).", ge=1)
    max_train_samples: int | None = setting(None, "Use only the first N training rows after a seeded shuffle (None: all).", ge=1)
    max_eval_samples: int | None = setting(None, "Use only the first N evaluation rows (None: all).", ge=1)
    skip_bad_rows: bool = setting(False, "Skip malformed rows and report how many were skipped, instead of stopping at the first.")
    eval_fraction: float = setting(0.05, "causal-lm only: fraction of the training text held out when no eval file is given.", gt=0, lt=1)
    group_by_length: bool = setting(True, "Batch examples of similar length together (less padding, same randomness across epochs).")
    encoding: str = setting("utf-8", "Text encoding of the data files (e.g. latin-1).")
    format: Literal["auto", "text", "chat", "alpaca", "prompt-completion"] = setting("auto", "causal-lm data shape. auto: .txt is raw text; JSONL/JSON by its first row's keys (messages: chat, instruction + output: alpaca, prompt + completion). Chat/instruction data trains on the answers only (docs/llm.md).")
    chat_template: Literal["auto", "model", "fallback", "none"] = setting("auto", "Chat/instruction data: how conversations are rendered. auto: the tokenizer's template, else slimtune's fallback (### User: / ### Assistant:); model; fallback; none: contents concatenated, EOS after each answer.")
    packing: bool = setting(False, "Chat/instruction data: pack whole training examples into blocks of max_length tokens (position ids restart per example, so attention stays within each example).")


@dataclass
class TrainConfig:
    """The one training loop's settings (shared by every method)."""

    epochs: float | None = setting(None, "Passes over the training data (fractional allowed). Ignored when max_steps > 0. None: the method's default (3 for every built-in method).", gt=0)
    min_steps: int | None = setting(None, "Floor on optimizer steps when the run length is derived from epochs (small files train at least this long). None: the method's default when epochs and max_steps are not given, else 0.", ge=0)
    max_steps: int = setting(-1, "Optimizer steps to run; -1 derives them from epochs.", ge=-1)
    batch_size: int = setting(32, "Examples per micro-batch; with several processes the global micro-batch, split across them.", ge=1)
    eval_batch_size: int = setting(64, "Examples per evaluation batch.", ge=1)
    grad_accum: int = setting(1, "Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum).", ge=1)
    lr: float | Literal["auto"] | None = setting(None, "Peak learning rate of AdamW. None: the method's declared default (full 1e-4, lora 1e-3, ia3 1e-2, ...; slimtune finetune --print-config shows it). auto (slimtune finetune): a short lr range test on the training data picks it (curve in metrics.json).", gt=0)
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).", ge=0)
    warmup_ratio: float = setting(0.06, "Fraction of steps with linear warm-up from 0 to lr.", ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = setting("linear", "Decay after warm-up.")
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm to this value (0 disables clipping).", ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting("auto", "Autocast precision. auto: bf16 on GPUs that support it, fp32 on CPU (CPU bf16 is slower without AMX).")
    eval_every: int = setting(0, "Evaluate every N optimizer steps (0: at the end of every epoch).", ge=0)
    save_every: int = setting(0, "Write a resumable checkpoint every N optimizer steps (0: at every evaluation).", ge=0)
    keep_checkpoints: int = setting(1, "Resumable checkpoints kept on disk (the best model is kept separately).", ge=1)
    early_stopping_patience: int = setting(0, "Stop after this many evaluations without improvement (0: never).", ge=0)
    metric: str = setting("auto", "Metric that picks the best checkpoint: accuracy, macro_f1, loss (auto: accuracy, or loss for causal-lm).")
    seed: int = setting(42, "Seed for shuffling, dropout and initialisation; the same seed gives the same run.")
    num_threads: int = setting(0, "CPU threads for torch (0: torch's default).", ge=0)
    log_every: int = setting(10, "Log loss and learning rate every N optimizer steps.", ge=1)
    resume: bool = setting(True, "Resume from the newest checkpoint in the output directory if one exists.")
    tensorboard: bool = setting(True, "Also write TensorBoard logs (when tensorboard is installed).")
    progress: bool = setting(True, "Show a progress bar (on a terminal).")
    fsdp: bool = setting(False, "With several processes (--nproc / torchrun): shard weights, gradients and optimizer state (FSDP2 FULL_SHARD) instead of replicating them (DDP). For models that do not fit one device.")
    ddp_find_unused_parameters: bool = setting(False, "DDP: tolerate trainable parameters that get no gradient in a step (slower; needed only by models with unused trainable weights).")


@dataclass
class Recipe:
    """A whole run. ``method`` holds the config dataclass of the method named by ``method.name``."""

    output: str | None = setting(None, "Output directory; everything the run writes goes here.")
    overwrite: bool = setting(False, "Replace a finished run in the output folder (it is cleared first: the run starts from step 0). Without it, a finished output is an error; an unfinished one is resumed.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: Any = None  # filled by resolve(): an instance of the method's registered config class
    method_name: str = setting("full", "Fine-tuning method, saved as method.name (one of the registered methods); its settings are the other method.* keys.", flag="--method")  # saved as method.name
    # ``slimtune distill`` recipes only: a slimtune.compress.distill.recipe.DistillConfig (None: no such section)
    distill: Any = None
    # key -> {"value", "source"} for every defaulted value (slimtune.config.defaults); saved as ``provenance:``
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-safe), the form saved as ``recipe.yaml``."""
        out: dict[str, Any] = {"output": self.output, "overwrite": self.overwrite}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["method"] = {"name": self.method_name, **(dataclasses.asdict(self.method) if self.method else {})}
        if self.distill is not None:
            out["distill"] = dataclasses.asdict(self.distill)
        if self.provenance:
            out["provenance"] = {k: dict(v) for k, v in self.provenance.items()}
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the fully resolved recipe as YAML (atomically).

        ``overwrite`` is saved as false: a run repeated from its ``recipe.yaml`` asks again
        before it replaces a finished output.
        """
        atomic_write_text(path, yaml.safe_dump({**self.to_dict(), "overwrite": False}, sort_keys=False))


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def resolve(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    """Turn a nested dict (YAML + flags + overrides) into a validated :class:`Recipe`."""
    from slimtune.data.packaged import expand_tree  # loads torch: importing config stays lean
    from slimtune.methods import get_method, method_names  # loads torch: config stays lean

    valid_top = ["output", "overwrite", *SECTIONS, "method", "distill", "provenance"]  # distill: slimtune distill only; provenance: informational
    for k in tree:
        if k not in valid_top:
            raise RecipeError(f"{source}: unknown section '{k}'; valid sections: {', '.join(valid_top)}")

    tree = expand_tree(tree)  # packaged:NAME/SPLIT data paths -> the real files (recorded in recipe.yaml)
    recipe = Recipe(output=coerce(tree.get("output"), str | None, "output"),
                    overwrite=coerce(tree.get("overwrite", False), bool, "overwrite"))
    for name, cls in SECTIONS.items():
        setattr(recipe, name, build_section(cls, tree.get(name) or {}, name))
    inferred = None if "task" in (tree.get("model") or {}) else infer_task(recipe)
    mtree = dict(tree.get("method") or {"name": "full"})
    mname = mtree.pop("name", "full")
    if mname not in method_names():
        raise RecipeError(f"method.name: unknown method {mname!r}; registered: {', '.join(method_names())}")
    mcfg = build_section(get_method(mname).config_cls, mtree, "method")
    recipe.method = mcfg
    recipe.method_name = mname
    recorded = tree.get("provenance") if isinstance(tree.get("provenance"), dict) else None
    recipe.provenance = apply_method_defaults(recipe, get_method(mname), recorded)
    if inferred is not None:
        recipe.provenance["model.task"] = inferred
    if recipe.data.max_length == "auto":  # resolved from the data by the run (slimtune.train.auto)
        recipe.provenance["data.max_length"] = {"value": "auto", "source": "auto (resolved when the data is read)"}
    elif "data.max_length" in (recorded or {}) and recorded["data.max_length"].get("value") == recipe.data.max_length:
        recipe.provenance["data.max_length"] = dict(recorded["data.max_length"])
    if "distill" in tree:  # written by slimtune distill beside its student; validated below

        recipe.distill = build_section(DistillConfig, tree["distill"] or {}, "distill")
    validate(recipe)
    return recipe


def infer_task(recipe: Recipe) -> dict[str, str] | None:
    """Set ``model.task`` from the data and the model when the user named none.

    Chat / Alpaca / prompt-completion JSONL is instruction data: causal-lm (the file's shape says
    it, as ``slimtune finetune --model smollm2 --train chat.jsonl`` expects). A ``.txt`` file for a
    causal-LM model is raw-LM text. Anything else stays classification. Returns the provenance
    entry when the task was inferred as causal-lm, else None.
    """
    from slimtune.compress.inputs import is_causal_lm_folder  # transformers: config stays lean
    from slimtune.data.chat import detect_format, first_object  # loads torch: config stays lean

    train = recipe.data.train
    if not train or not Path(train).is_file():
        return None
    suffix = Path(train).suffix.lower()
    if suffix in (".jsonl", ".json"):
        first = first_object(Path(train), recipe.data.encoding)
        fmt = detect_format(first[1]) if first else None
        if fmt in ("chat", "alpaca", "prompt-completion"):
            recipe.model.task = "causal-lm"
            return {"value": "causal-lm", "source": f"auto ({train} holds {fmt} rows)"}
    if suffix == ".txt" and is_causal_lm_folder(recipe.model.name):
        recipe.model.task = "causal-lm"
        return {"value": "causal-lm", "source": f"auto ({recipe.model.name} is a causal LM, {train} is text)"}
    return None


def validate(recipe: Recipe, check_files: bool = True) -> None:
    """Check ranges (declared on the fields), cross-field rules and that input files exist.
    Loads no weights."""
    t, d, m = recipe.train, recipe.data, recipe.model
    for name in SECTIONS:
        check_ranges(getattr(recipe, name), name)
    if t.lr == "auto" and recipe.distill is not None:
        raise RecipeError("train.lr: auto (the lr range test) is supported by slimtune finetune only; give a number")
    if t.max_steps == 0 or t.max_steps < -1:
        raise RecipeError(f"train.max_steps: must be -1 (from epochs) or >= 1, got {t.max_steps}")
    if t.metric not in ("auto", "accuracy", "macro_f1", "loss"):
        raise RecipeError(f"train.metric: {t.metric!r} is not one of ['auto', 'accuracy', 'macro_f1', 'loss']")
    if m.task == "causal-lm" and t.metric in ("accuracy", "macro_f1"):
        raise RecipeError(f"train.metric: {t.metric!r} needs labels; causal-lm uses 'loss'")
    if t.fsdp and t.precision == "fp16":  # the loop refuses it once sharded (--nproc > 1)
        raise RecipeError("train.precision: fp16 is not supported with train.fsdp (sharded gradients need a "
                          "sharded loss scaler); use bf16")
    if check_files:
        for key, path in (("data.train", d.train), ("data.eval", d.eval)):
            if path is not None and not Path(path).is_file():
                raise RecipeError(f"{key}: file not found: {path}")
    if recipe.method is not None:
        check_ranges(recipe.method, "method")
    check = getattr(recipe.method, "validate", None)
    if check is not None:
        check(recipe)
    if recipe.distill is not None:
        recipe.distill.validate(recipe)


def field_help() -> list[tuple[str, str, str]]:
    """(key, default, help) for every recipe field, methods included: the ``--help`` listing."""
    from slimtune.methods import get_method, method_names  # loads torch: config stays lean

    rows: list[tuple[str, str, str]] = [(k, d, Recipe.__dataclass_fields__[k].metadata["help"])
                                        for k, d in (("output", "None"), ("overwrite", "False"))]
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
