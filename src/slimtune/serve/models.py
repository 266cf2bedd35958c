"""Models behind ``slimtune serve``: load any slimtune output folder as a :class:`Runner`.

Backends (``load_runner``): plain transformers folders (fp32, pruned, fine-tuned) run in torch;
folders holding ``model.onnx`` run in ONNX Runtime; ``quantization.json`` folders run slimtune's
quantized torch model. All expose the same tiny Runner interface, so the batcher and the HTTP
layer never ask which one they have. Causal LMs are loaded as a decoder backend for continuous
batching: :class:`slimtune.serve.torch_lm.TorchDecoder` for transformers folders,
:class:`slimtune.serve.llamacpp_lm.LlamaCppDecoder` for GGUF folders (``model.gguf`` + HF
tokenizer: what ``slimtune quantize`` writes when llama.cpp measured fastest).

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
from slimtune.models.loading import load_model, load_tokenizer, resolve
from slimtune.runtime.classifier import load_classifier
from slimtune.runtime.gguf_folder import GGUF_FILE, GGUF_SIDECAR, is_gguf_folder
from slimtune.runtime.llamacpp import llamacpp_available
from slimtune.serve.lm_backend import DecoderBackend
from slimtune.serve.torch_lm import TorchDecoder


@dataclass
class Runner:
    """What the batcher needs from a model, whatever runs it.

    ``logits(batch)`` (classifiers) maps padded int64 arrays (``input_ids``, ``attention_mask``,
    maybe ``token_type_ids``; each (B, T)) to a float array (B, C); ``lm`` (causal LMs) is the
    decoder backend continuous batching steps (:class:`slimtune.serve.lm_backend.DecoderBackend`).
    """

    task: str  # "classification" | "causal-lm"
    backend: str  # "torch" | "onnxruntime" | "torch-quantized" | "llama.cpp" (causal LMs: GGUF folders)
    tokenizer: Any
    max_length: int  # tokens per text (classification) or prompt (causal-lm)
    label_names: list[str] = field(default_factory=list)
    multi_label: bool = False
    logits: Any = None  # Callable[[dict[str, np.ndarray]], np.ndarray]
    lm: DecoderBackend | None = None
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


def _gguf_runner(d: Path, tok: Any, threads: int | None, device: str, max_sequences: int) -> Runner:
    """A GGUF folder behind :class:`~slimtune.serve.llamacpp_lm.LlamaCppDecoder` (CPU)."""
    if device != "cpu":
        raise ValueError(f"{d}: a GGUF folder runs on llama.cpp's CPU build here; serve it with --device cpu")
    if not llamacpp_available():
        raise ValueError(f"{d}: its weights are {GGUF_FILE}, run by llama.cpp; install llama-cpp-python "
                         f"(scripts/install.sh builds it)")
    from slimtune.serve.llamacpp_lm import LlamaCppDecoder, folder_eos_ids  # needs llama_cpp

    side = d / GGUF_SIDECAR
    name = json.loads(side.read_text(encoding="utf-8")).get("file", GGUF_FILE) if side.is_file() else GGUF_FILE
    lm = LlamaCppDecoder(d / name, tok, folder_eos_ids(d, tok), threads=threads or 0, max_batch=max_sequences)
    return Runner("causal-lm", lm.name, tok, max_length=lm.context_length, lm=lm, device=device)


def load_runner(model_dir: str, threads: int | None = None, device: str = "cpu", max_sequences: int = 8) -> Runner:
    """Load any slimtune output folder behind the Runner interface.

    Classifiers: ``model.onnx`` -> ONNX Runtime, ``quantization.json`` -> slimtune's quantized
    torch model, else transformers. Causal LMs (``architectures`` ending in ForCausalLM) run in
    transformers behind :class:`~slimtune.serve.torch_lm.TorchDecoder`; GGUF folders in llama.cpp,
    holding up to ``max_sequences`` sequences (KV streams of 2,048 tokens each, allocated at
    load). ``model_dir`` may be a
    packaged alias (``smollm2``). ``device`` ``cuda[:N]`` runs torch models and ONNX Runtime (CUDA provider) on
    that GPU. Raises FileNotFoundError/ValueError with the folder (or ``--device``) named when it
    cannot be served.
    """

    check_device(device)
    d = Path(resolve(model_dir))  # a packaged alias (smollm2, minilm) serves its cached folder
    cfg = _config(d)
    task = model_task(str(d))
    tok = load_tokenizer(str(d))
    if task == "causal-lm":
        if is_gguf_folder(d):
            return _gguf_runner(d, tok, threads, device, max_sequences)
        if (d / "model.onnx").is_file() and not (d / "model.safetensors").is_file():
            raise ValueError(f"{d}: serving ONNX causal LMs is not supported; serve the safetensors folder")
        if threads:
            torch.set_num_threads(threads)
        lm = TorchDecoder(load_model(str(d), "causal-lm").eval().to(device), tok, device,
                          cfg.get("max_position_embeddings") or 2048)
        return Runner("causal-lm", lm.name, tok, max_length=lm.context_length, lm=lm, device=device)
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
    elif runner.lm is not None:
        ids = tok("warm up")["input_ids"] or [0]
        runner.lm.prefill([(-1, ids)])
        runner.lm.decode([-1], [ids[-1]])
        runner.lm.release([-1])


__all__ = ["Runner", "check_device", "load_runner", "pad_batch", "warmup"]
