"""What is being exported: any slimtune output folder, read cheaply first, then loaded as one model.

:func:`inspect_source` reads only JSON files (``config.json``, ``adapter_config.json``,
``tokenizer.json``, the sidecars) so ``slimtune export`` refuses what a format cannot hold
before a weight loads. :func:`load_source` then loads the model the way every other command
does: base + PEFT adapter folders are merged (:func:`slimtune.runtime.generate.load_for_generation`),
a method's own format goes through :func:`slimtune.models.loading.load_model`, a quantized
folder is decoded to the float weights it computes with. :func:`plain_model` gives the plain
``transformers`` model GGUF and safetensors store, or refuses one with extra modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from slimtune.compress.inputs import DECODER_ALIASES, causal_lm_reason
from slimtune.compress.quant.storage import load_quantized
from slimtune.models.loading import (
    ALIASES,
    ModelError,
    check_exists,
    load_model,
    load_tokenizer,
    resolve,
)
from slimtune.runtime.generate import load_for_generation

GGUF_ARCHITECTURES = ("LlamaForCausalLM",)
# tokenizer.json pre-tokenizers that are byte-level BPE (what llama.cpp's "gpt2" tokenizer runs)
_BYTE_LEVEL = "ByteLevel"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj


@dataclass
class SourceInfo:
    """What a model folder holds, read from its JSON files (no weights)."""

    path: str  # the folder whose config.json describes the model (the base of an adapter)
    kind: str  # "hf", "adapter", "method:<name>", "quantized", "onnx" or "alias"
    config: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None  # the PEFT adapter folder merged in, if any
    tokenizer_dir: str | None = None

    @property
    def task(self) -> str | None:
        """``causal-lm``, ``classification``, or None (a bare encoder or something else)."""
        if causal_lm_reason(self.config) is not None:
            return "causal-lm"
        archs = [a for a in self.config.get("architectures") or [] if isinstance(a, str)]
        return "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else None

    @property
    def architecture(self) -> str:
        archs = [a for a in self.config.get("architectures") or [] if isinstance(a, str)]
        return archs[0] if archs else f"model_type {self.config.get('model_type')!r}"

    def refusal(self, fmt: str) -> str | None:
        """Why ``fmt`` cannot hold this model (one sentence), or None."""
        if self.kind == "onnx":
            return "an ONNX folder (model.onnx); export the float model it was made from"
        if self.task is None:
            return (f"{self.architecture} is neither a causal LM nor a sequence classifier; export writes task "
                    "models (fine-tune it first: slimtune finetune)")
        if self.task == "classification" and self.adapter is not None:
            return ("a classifier adapter folder; export the merged folder `slimtune finetune` writes beside it "
                    "(--export merged or both)")
        if fmt == "gguf":
            return self._gguf_refusal()
        return None

    def _gguf_refusal(self) -> str | None:
        if self.task != "causal-lm":
            return (f"a sequence classifier ({self.architecture}); GGUF holds decoders for llama.cpp: use "
                    "--format onnx or safetensors")
        if self.architecture not in GGUF_ARCHITECTURES:
            return f"{self.architecture}: GGUF export writes {', '.join(GGUF_ARCHITECTURES)} only"
        cfg = self.config
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                return f"config.json {key}: true; the GGUF writer here stores bias-free Llama layers only"
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", "linear"):
            return f"config.json rope type {rope_type!r}: the GGUF writer here stores default or linear RoPE only"
        return self._tokenizer_refusal()

    def _tokenizer_refusal(self) -> str | None:
        if self.tokenizer_dir is None:
            return None  # an alias: its tokenizer is checked when it is loaded
        tj = Path(self.tokenizer_dir) / "tokenizer.json"
        if not tj.is_file():
            return f"{tj}: not found; GGUF export needs the fast tokenizer file (byte-level BPE)"
        tok = _read_json(tj)
        model_type = (tok.get("model") or {}).get("type")
        if model_type != "BPE" or _BYTE_LEVEL not in json.dumps(tok.get("pre_tokenizer")):
            return (f"{tj}: a {model_type} tokenizer without a byte-level pre-tokenizer; GGUF export writes "
                    "byte-level BPE tokenizers (llama.cpp's gpt2 model) only")
        return None


def inspect_source(model: str, adapter: str | None = None) -> SourceInfo:
    """Read what ``model`` (+ ``adapter``) is, from JSON files only.

    Raises:
        ModelError: no such folder, or a folder that is not a model (one line naming it).
    """
    if model in ALIASES:
        check_exists(model)  # the package is installed; its weights are converted on load
        arch = "LlamaForCausalLM" if model in DECODER_ALIASES else "BertModel"
        return SourceInfo(model, "alias", {"architectures": [arch], "model_type": "llama" if model in DECODER_ALIASES else "bert"},
                          adapter=adapter)
    p = Path(model)
    if not p.is_dir():
        raise ModelError(f"--model {model}: no such model folder")
    if adapter is None and not (p / "config.json").is_file():
        # a PEFT adapter folder (OUT/adapter), or a finetune output holding only its adapter
        adapter = next((str(c) for c in (p, p / "adapter") if (c / "adapter_config.json").is_file()), None)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelError(f"--adapter {adapter}: no adapter_config.json (not a PEFT adapter folder)")
    if adapter is not None and not (p / "config.json").is_file():
        acfg = Path(adapter) / "adapter_config.json"
        base = _read_json(acfg).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{acfg}: no base_model_name_or_path; pass --model BASE --adapter {adapter}")
        info = inspect_source(str(base))
        tok = adapter if (Path(adapter) / "tokenizer.json").is_file() else info.tokenizer_dir
        return SourceInfo(info.path, "adapter", info.config, adapter=adapter, tokenizer_dir=tok)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{p}: not a model folder (no config.json)")
    kind = "hf"
    if (p / "model.onnx").is_file() and not any(p.glob("*.safetensors")):
        kind = "onnx"
    elif (p / "quantization.json").is_file():
        kind = "quantized"
    elif (p / "slimtune_method.json").is_file():
        kind = "method:" + str(_read_json(p / "slimtune_method.json").get("method"))
    if adapter is not None:
        kind = "adapter"
    return SourceInfo(str(p), kind, _read_json(cfg_path), adapter=adapter, tokenizer_dir=str(p))


@dataclass
class Source:
    """A loaded model to export, with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: Any
    info: SourceInfo

    @property
    def task(self) -> str:
        return str(self.info.task)


def load_source(info: SourceInfo) -> Source:
    """Load the model ``info`` describes (float32, eval mode), adapters merged."""
    if info.kind == "quantized":
        model = load_quantized(info.path, dequantize=True)
        tokenizer = load_tokenizer(info.path)
    elif info.task == "causal-lm":
        model, tokenizer, _ = load_for_generation(info.path, info.adapter)
    else:
        model = load_model(info.path, "classification")
        tokenizer = load_tokenizer(info.path)
    if info.kind == "alias":
        info = inspect_source(resolve(info.path), info.adapter)  # now a real folder: its tokenizer.json can be read
    model.eval()
    return Source(model, tokenizer, info)


def plain_model(src: Source, fmt: str) -> PreTrainedModel:
    """The plain ``transformers`` model holding ``src``'s weights (the loaded model itself when it is one).

    Raises:
        ModelError: the model has modules a plain ``transformers`` model of its config cannot hold
            (a method that adds layers, an adapter that cannot merge), naming a tensor.
    """
    model = src.model
    auto = AutoModelForCausalLM if src.task == "causal-lm" else AutoModelForSequenceClassification
    if not isinstance(model, PreTrainedModel):
        raise ModelError(f"{src.info.path}: loads as {type(model).__name__}, not a transformers model; "
                         f"--format {fmt} stores plain transformers weights")
    with torch.device("meta"):  # shapes and names only: no 135M-weight random init to compare keys
        skeleton = auto.from_config(model.config, dtype=torch.float32)
    want, have = skeleton.state_dict(), model.state_dict()
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    if extra or missing:
        what = f"extra tensor {extra[0]}" if extra else f"no tensor {missing[0]}"
        raise ModelError(f"{src.info.path}: a {src.info.kind} model with {what}; --format {fmt} stores a plain "
                         f"{type(skeleton).__name__} (export --format onnx keeps the model as it runs)")
    bad = next((k for k in want if want[k].shape != have[k].shape), None)
    if bad is not None:
        raise ModelError(f"{src.info.path}: tensor {bad} has shape {tuple(have[bad].shape)}, config.json says "
                         f"{tuple(want[bad].shape)}")
    if type(model) is type(skeleton):
        return model
    plain = auto.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict({k: v.detach().float() for k, v in have.items()})
    plain.generation_config = getattr(model, "generation_config", plain.generation_config)
    return plain.eval()
