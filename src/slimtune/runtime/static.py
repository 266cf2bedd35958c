"""Static-embedding classifiers: the folder format and its numpy runtime.

A static-embedding classifier (built by :mod:`slimtune.compress.distill.static`) is an
embedding table and a linear head; prediction is

    pooled = mean of E[t] over the tokens t of the text (attention mask on, special tokens off)
    logits = W @ pooled + b

The folder holds ``model.safetensors``, ``config.json`` and the tokenizer files, and nothing
needs slimtune to read it::

    import json, numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    t = load_file("DIR/model.safetensors")
    cfg = json.load(open("DIR/config.json"))
    E = t["embeddings"].astype(np.float32)                      # (V, d): float32, float16 or int8
    if "embedding_scales" in t:                                  # int8 rows: one scale per row
        E = E * t["embedding_scales"][:, None]
    tok = AutoTokenizer.from_pretrained("DIR")
    ids = [i for i in tok("a fine film")["input_ids"] if i not in set(cfg["ignore_ids"])]
    logits = t["head.weight"] @ E[ids].mean(0) + t["head.bias"]
    label = cfg["id2label"][str(int(logits.argmax()))]

``config.json`` has ``slimtune_format: "static-embedding"`` (how slimtune recognises the
folder; no ``model_type``, so transformers does not mistake it for one of its models),
``architectures: ["StaticEmbeddingClassifier"]``, ``id2label``/``label2id``, ``hidden_size``
(d), ``vocab_size``, ``ignore_ids`` (token ids never pooled: the tokenizer's special tokens),
``storage`` (float32, float16 or int8) and ``pooling`` (``mean``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

FORMAT = "static-embedding"
ARCHITECTURE = "StaticEmbeddingClassifier"
WEIGHTS = "model.safetensors"
STORAGES = ("float32", "float16", "int8")


def is_static(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` is a static-embedding classifier folder (``config.json`` says so)."""

    p = Path(model_dir) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("slimtune_format") == FORMAT
    except (OSError, ValueError):
        return False


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``(codes int8 (V, d), scales float32 (V,))``, row = codes * scale."""

    t = np.asarray(table, dtype=np.float32)
    scales = np.abs(t).max(axis=1) / 127.0
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(t / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def save_static(out_dir: str | os.PathLike, table: np.ndarray, head_weight: np.ndarray, head_bias: np.ndarray,
                config: dict[str, Any], storage: str = "float16") -> Path:
    """Write ``model.safetensors`` + ``config.json`` of a static classifier into ``out_dir``.

    Args:
        table: (V, d) float embedding table.
        head_weight, head_bias: (C, d) and (C,) of the linear head (kept float32: tiny).
        config: id2label, label2id, ignore_ids and anything else to record; the format keys
            (slimtune_format, architectures, hidden_size, vocab_size, num_labels, storage,
            pooling) are filled in here.
        storage: how the table is stored: float32, float16 or int8 (per-row scales).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = np.asarray(table, dtype=np.float32)
    tensors: dict[str, np.ndarray] = {"head.weight": np.ascontiguousarray(head_weight, dtype=np.float32),
                                      "head.bias": np.ascontiguousarray(head_bias, dtype=np.float32)}
    if storage == "int8":
        tensors["embeddings"], tensors["embedding_scales"] = quantize_rows(table)
    else:
        tensors["embeddings"] = np.ascontiguousarray(table.astype(storage))
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "np", "slimtune_format": FORMAT})
    cfg = {**config, "slimtune_format": FORMAT, "architectures": [ARCHITECTURE],
           "hidden_size": int(table.shape[1]), "vocab_size": int(table.shape[0]),
           "num_labels": int(head_weight.shape[0]), "storage": storage, "pooling": "mean"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_static_arrays(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The float32 arrays of a static folder: ``embeddings`` (V, d), ``head.weight``, ``head.bias``,
    ``keep`` (V,) bool (False for ``ignore_ids``) and ``config``."""

    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    t = load_file(str(d / WEIGHTS))
    table = t["embeddings"].astype(np.float32)
    if "embedding_scales" in t:
        table = table * t["embedding_scales"].astype(np.float32)[:, None]
    keep = np.ones(table.shape[0], dtype=bool)
    ignore = [i for i in cfg.get("ignore_ids", []) if 0 <= int(i) < table.shape[0]]
    keep[np.asarray(ignore, dtype=np.int64)] = False
    return {"embeddings": np.ascontiguousarray(table), "head.weight": t["head.weight"].astype(np.float32),
            "head.bias": t["head.bias"].astype(np.float32), "keep": keep, "config": cfg}


def static_logits(arrays: dict[str, Any], input_ids: Any, attention_mask: Any = None) -> np.ndarray:
    """(B, C) float32 logits of a static classifier on padded ids (B, T) and their mask."""

    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    table = arrays["embeddings"]
    use = arrays["keep"][ids]
    if attention_mask is not None:
        use &= np.asarray(attention_mask).reshape(ids.shape) != 0
    if ids.shape[0] == 1:  # one text (the serving case): gather only the pooled rows
        rows = table[ids[0][use[0]]]
        pooled = rows.mean(0, keepdims=True) if len(rows) else np.zeros((1, table.shape[1]), np.float32)
    else:
        w = use.astype(np.float32)
        pooled = np.einsum("bt,btd->bd", w, table[ids]) / np.maximum(w.sum(1, keepdims=True), 1.0)
    return pooled @ arrays["head.weight"].T + arrays["head.bias"]


class StaticClassifierRuntime:
    """``(input_ids, attention_mask=None, token_type_ids=None) -> logits`` (torch float32, (B, C))
    for a static folder, computed in numpy (one gather, one mean, one small matmul).
    ``config`` is the folder's ``config.json``."""

    def __init__(self, model_dir: str | os.PathLike):

        self.arrays = load_static_arrays(model_dir)
        self.config = self.arrays["config"]

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> torch.Tensor:
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.numpy()
        if isinstance(attention_mask, torch.Tensor):
            attention_mask = attention_mask.numpy()
        return torch.from_numpy(np.ascontiguousarray(static_logits(self.arrays, input_ids, attention_mask)))


def load_static(model_dir: str | os.PathLike, threads: int | None = None) -> StaticClassifierRuntime:
    """Load a static-embedding folder as a classifier callable (``threads`` sets torch's, for callers
    that mix runtimes; the numpy math here is single-threaded at batch 1)."""

    if threads:
        torch.set_num_threads(threads)
    return StaticClassifierRuntime(model_dir)


def count_static_params(model_dir: str | os.PathLike) -> int:
    """Stored weights of a static folder (table + head; int8 row scales are not counted)."""

    with safe_open(str(Path(model_dir) / WEIGHTS), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k != "embedding_scales")
