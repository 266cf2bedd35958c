"""Teacher outputs computed once and kept on disk (safetensors, read memory-mapped).

A cache entry is ``<dir>/<key>.safetensors`` (tensor ``logits``: (N, C) for classifiers, or
(N, T, V) float16 for causal LMs) with a JSON sidecar ``<key>.json``. The key is a hash of

- the teacher's content: SHA-256 of its weight files and config.json,
- the data as the teacher sees it: SHA-256 of the token ids (so any change of rows, order,
  tokenizer or max_length gives a new key),
- the settings that change the numbers (teacher dtype, storage dtype, task).

So an entry is reused across epochs, runs and output folders, and is never used for a changed
teacher or changed data (those get a new key; the stale entry is simply not looked up).
Rows are read one by one from the memory-mapped file, so even a large LM cache is never fully
loaded into memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimtune.data.datasets import TokenizedData, collate, epoch_batches
from slimtune.io import atomic_write_json

CACHE_VERSION = 1


def hash_files(model_dir: str | os.PathLike) -> str:
    """SHA-256 over config.json and every weight file of a model folder (sorted by name)."""
    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.is_file() and
                   (p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise FileNotFoundError(f"{d}: no weight files (*.safetensors / *.bin) to fingerprint the teacher")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def hash_data(data: TokenizedData) -> str:
    """SHA-256 of the token ids (and token type ids) in order."""
    h = hashlib.sha256()
    for i, ids in enumerate(data.input_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        if data.token_type_ids is not None:
            h.update(torch.tensor(data.token_type_ids[i], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """Teacher logits for one (teacher, data, settings) triple, read row by row from disk."""

    def __init__(self, path: Path, status: str):

        self.path = path
        self.status = status  # "hit" (reused) or "miss" (computed now)
        self._file = safe_open(str(path), framework="pt")  # memory-mapped
        self._logits = self._file.get_slice("logits")
        self.shape = tuple(self._logits.get_shape())

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of examples ``ids`` (B,) as float32: (B, C) or (B, T, V)."""
        return torch.cat([self._logits[int(i): int(i) + 1] for i in ids.tolist()]).float()

    def all(self) -> torch.Tensor:
        """Every row (float32); for small caches (classifier logits)."""
        return self._file.get_tensor("logits").float()


@torch.no_grad()
def _teacher_logits(teacher: torch.nn.Module, data: TokenizedData, batch_size: int,
                    store_dtype: torch.dtype) -> torch.Tensor:
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out: torch.Tensor | None = None
    for idx in epoch_batches(data.lengths(), batch_size, 0, 0, shuffle=False, group_by_length=True):
        batch = collate(data, idx)
        batch.pop("labels", None)
        batch.pop("example_ids", None)
        logits = teacher(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if data.causal:
            if out is None:
                out = torch.empty((len(data), *logits.shape[1:]), dtype=store_dtype)
            out[torch.tensor(idx)] = logits.to(store_dtype)  # blocks all have the same length
        else:
            if out is None:
                out = torch.empty((len(data), logits.shape[-1]), dtype=store_dtype)
            out[torch.tensor(idx)] = logits.to(store_dtype)
    teacher.train(was_training)
    assert out is not None
    return out


def teacher_cache(teacher: torch.nn.Module, teacher_dir: str, data: TokenizedData, cache_dir: str | os.PathLike,
                  *, settings: dict[str, Any] | None = None, batch_size: int = 64,
                  teacher_hash: str | None = None) -> TeacherCache:
    """Open the cache entry of ``teacher`` on ``data``, computing and writing it on a miss.

    Args:
        teacher: the loaded teacher (used only on a miss), in the dtype the entry records.
        teacher_dir: the teacher's folder (its files are hashed into the key).
        data: the data exactly as the teacher sees it (its own tokenization).
        cache_dir: folder of cache entries (created if missing).
        settings: anything else that changes the numbers (e.g. teacher dtype); part of the key.
        batch_size: teacher batch size on a miss.
        teacher_hash: precomputed :func:`hash_files` of ``teacher_dir`` (saves re-reading it).
    """

    store_dtype = torch.float16 if data.causal else torch.float32  # LM logits are large: half
    meta = {"version": CACHE_VERSION, "teacher": teacher_hash or hash_files(teacher_dir),
            "data": hash_data(data), "n": len(data), "causal": data.causal,
            "store_dtype": str(store_dtype).removeprefix("torch."), "settings": settings or {}}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir)
    path, sidecar = root / f"{key}.safetensors", root / f"{key}.json"
    if path.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()).get("key_fields") == meta:
                cache = TeacherCache(path, "hit")
                if len(cache) == len(data):
                    return cache
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # unreadable or torn entry: recompute it below
    root.mkdir(parents=True, exist_ok=True)
    # A miss can take minutes (one teacher forward per row): say so before the wait.
    print(f"[slimtune] teacher logits: running the teacher once on {len(data):,} rows; later runs on the same "
          f"teacher and data reuse {path}", file=sys.stderr)
    logits = _teacher_logits(teacher, data, batch_size, store_dtype)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    save_file({"logits": logits.contiguous()}, str(tmp))
    os.replace(tmp, path)  # weights first, then the sidecar that validates them
    atomic_write_json(sidecar, {"key_fields": meta, "teacher_dir": str(teacher_dir),
                                "shape": list(logits.shape)})
    return TeacherCache(path, "miss")


def hash_state(model: torch.nn.Module) -> str:
    """SHA-256 of a loaded model's tensors (for teachers that are not a local folder)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + b"\0" + str(t.dtype).encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()
