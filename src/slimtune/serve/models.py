"""Models behind ``slimtune serve``: load any slimtune output folder as a :class:`Runner`.

Backends (``load_runner``): plain transformers folders (fp32, pruned, fine-tuned) run in torch;
folders holding ``model.onnx`` run in ONNX Runtime; ``quantization.json`` folders run slimtune's
quantized torch model. All expose the same tiny Runner interface, so the batcher and the HTTP
layer never ask which one they have.

Top-level imports are stdlib only; numpy, torch and onnxruntime are imported where used.
"""

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from slimtune.evaluate.evaluator import model_task
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.runtime.classifier import load_classifier


@dataclass
class Runner:
    """What the batcher needs from a model, whatever runs it.

    ``logits(batch)`` maps padded int64 arrays (``input_ids``, ``attention_mask``, maybe
    ``token_type_ids``; each (B, T)) to a float array (B, C); ``generate`` (causal LMs only)
    maps a left-padded batch to new token ids per row.
    """

    task: str  # "classification" | "causal-lm"
    backend: str  # "torch" | "onnxruntime"
    tokenizer: Any
    max_length: int  # tokens per text (classification) or prompt (causal-lm)
    label_names: list[str] = field(default_factory=list)
    multi_label: bool = False
    logits: Any = None  # Callable[[dict[str, np.ndarray]], np.ndarray]
    generate: Any = None  # Callable[[dict[str, np.ndarray], int, float, float], list[list[int]]]
    eos_ids: tuple[int, ...] = ()
    device: str = "cpu"  # where the forward passes run ("cpu", "cuda", "cuda:1")


def _config(model_dir: Path) -> dict[str, Any]:
    p = model_dir / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from None


def _label_names(cfg: dict[str, Any]) -> list[str]:
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    n = len(id2label) or int(cfg.get("num_labels", 2))
    return [id2label.get(i, f"LABEL_{i}") for i in range(n)]


def _max_length(model_dir: Path, cfg: dict[str, Any], tokenizer: Any) -> int:
    """The recipe's data.max_length if saved, else what the model and tokenizer allow (<= 512)."""
    recipe = model_dir / "recipe.yaml"
    if recipe.is_file():

        n = ((yaml.safe_load(recipe.read_text()) or {}).get("data") or {}).get("max_length")
        if isinstance(n, int) and n > 0:
            return n
    limits = [512, cfg.get("max_position_embeddings") or 512, getattr(tokenizer, "model_max_length", 512)]
    return int(min(x for x in limits if isinstance(x, int) and x > 0))


def check_device(device: str) -> None:
    """Raise ValueError naming ``--device`` unless it is ``cpu`` or a CUDA device this machine has."""

    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine (torch.cuda.is_available() is False)")
    if _cuda_index(device) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def _accelerated_classifier(model_dir: Path, device: str) -> Any:
    """``logits(batch)`` on a CUDA device: transformers folders in torch, ``model.onnx`` in ONNX
    Runtime's CUDA provider. slimtune's ``quantization.json`` folders use CPU int8 kernels and are
    refused (serve them on the CPU, or serve the fp32 folder on the GPU)."""

    if (model_dir / "model.onnx").is_file():
        import onnxruntime as ort  # optional dependency (the quant extra)

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"--device {device}: this onnxruntime has no CUDA provider "
                             f"({ort.get_available_providers()}); install onnxruntime-gpu")
        sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[
            ("CUDAExecutionProvider", {"device_id": _cuda_index(device)}), "CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out_names = [o.name for o in sess.get_outputs()]
        out_name = "logits" if "logits" in out_names else out_names[0]

        def logits_ort(batch: dict[str, Any]) -> Any:
            feed = {n: batch.get(n, np.zeros_like(batch["input_ids"])) for n in names}
            return np.asarray(sess.run([out_name], feed)[0], dtype=np.float32)

        return logits_ort
    if (model_dir / "quantization.json").is_file():
        raise ValueError(f"--device {device}: {model_dir} holds slimtune's CPU int8 format; serve it with "
                         f"--device cpu, or serve the unquantized folder on the GPU")

    model = load_model(str(model_dir), "classification").eval().to(device)
    accepted = set(inspect.signature(model.forward).parameters)

    def logits_cuda(batch: dict[str, Any]) -> Any:
        feed = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items() if k in accepted}
        with torch.inference_mode():
            return model(**feed).logits.float().cpu().numpy()

    return logits_cuda


def _classifier(model_dir: Path, threads: int | None, device: str = "cpu") -> Any:
    """``logits(batch)`` for a classifier folder.

    CPU: ``slimtune.compress.quant.recipe.load_classifier``, the one loader for every slimtune output (ONNX,
    quantized ``quantization.json`` folders, plain HF). CUDA devices: :func:`_accelerated_classifier`.
    """
    if device != "cpu":
        return _accelerated_classifier(model_dir, device)

    clf = load_classifier(model_dir, threads)  # (input_ids, attention_mask, token_type_ids) -> logits

    def logits_any(batch: dict[str, Any]) -> Any:
        out = clf(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        return out.float().numpy() if hasattr(out, "numpy") else np.asarray(out)

    return logits_any


def _torch_generator(model_dir: Path, threads: int | None, pad_id: int, device: str = "cpu") -> Any:

    if threads:
        torch.set_num_threads(threads)
    model = load_model(str(model_dir), "causal-lm").eval().to(device)

    def generate(batch: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float) -> list[list[int]]:
        ids = torch.from_numpy(batch["input_ids"]).to(device)
        kw: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kw)
        return out[:, ids.shape[1]:].tolist()  # (B, new) new tokens only (prompts are left-padded)

    return generate


def load_runner(model_dir: str, threads: int | None = None, device: str = "cpu") -> Runner:
    """Load any slimtune output folder behind the Runner interface.

    Classifiers: ``model.onnx`` -> ONNX Runtime, ``quantization.json`` -> slimtune's quantized
    torch model, else transformers. Causal LMs (``architectures`` ending in ForCausalLM) run in
    transformers. ``device`` ``cuda[:N]`` runs torch models and ONNX Runtime (CUDA provider) on
    that GPU. Raises FileNotFoundError/ValueError with the folder (or ``--device``) named when it
    cannot be served.
    """

    check_device(device)
    d = Path(model_dir)
    cfg = _config(d)
    task = model_task(str(d))
    tok = load_tokenizer(str(d))
    if task == "causal-lm":
        if (d / "model.onnx").is_file() and not (d / "model.safetensors").is_file():
            raise ValueError(f"{d}: serving ONNX causal LMs is not supported; serve the safetensors folder")
        tok.padding_side = "left"  # generation appends on the right
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids = tuple(dict.fromkeys([*eos_ids, tok.eos_token_id]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        n_pos = cfg.get("max_position_embeddings") or 2048
        return Runner("causal-lm", "torch", tok, max_length=int(n_pos),
                      generate=_torch_generator(d, threads, pad, device), eos_ids=eos_ids, device=device)
    backend = ("onnxruntime" if (d / "model.onnx").is_file()
               else "torch-quantized" if (d / "quantization.json").is_file() else "torch")
    return Runner("classification", backend, tok, _max_length(d, cfg, tok),
                  label_names=_label_names(cfg),
                  multi_label=cfg.get("problem_type") == "multi_label_classification",
                  logits=_classifier(d, threads, device), device=device)


def pad_batch(encs: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Pad token lists to the longest row: {key: int64 array (B, T)} (pad id for input_ids, else 0)."""

    width = max(len(e["input_ids"]) for e in encs)
    out = {}
    for key in encs[0]:
        arr = np.full((len(encs), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for i, e in enumerate(encs):
            seq = e[key]
            if left:
                arr[i, width - len(seq):] = seq
            else:
                arr[i, :len(seq)] = seq
        out[key] = arr
    return out


def warmup(runner: Runner) -> None:
    """One forward pass before the first request (first calls allocate and pick kernels)."""
    tok = runner.tokenizer
    if runner.task == "classification":
        runner.logits(pad_batch([dict(tok("warm up"))], tok.pad_token_id or 0))
    else:
        runner.generate(pad_batch([{"input_ids": tok("hi")["input_ids"], "attention_mask": [1] * len(tok("hi")["input_ids"])}],
                                  tok.pad_token_id or 0, left=True), 1, 0.0, 1.0)


__all__ = ["Runner", "check_device", "load_runner", "pad_batch", "warmup"]
