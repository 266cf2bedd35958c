"""Atomic file writes and on-disk sizes.

Every artifact is written to a temporary name in the same directory and then renamed: a run
killed at any instant leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# mkstemp/mkdtemp create 0600 files and 0700 folders; artifacts get the usual umask modes instead
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def update_json(path: str | os.PathLike, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into the JSON object stored at ``path`` (created if absent)."""
    path = Path(path)
    current: dict[str, Any] = {}
    if path.is_file():
        current = json.loads(path.read_text(encoding="utf-8"))
    current.update(values)
    atomic_write_json(path, current)
    return current


def atomic_dir(final: str | os.PathLike):
    """Context manager yielding a temp directory that replaces ``final`` on success.

    The old ``final`` (if any) is removed only after the new one is complete.
    """
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.tmp-"))
        os.chmod(self.tmp, DIR_MODE)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def weights_size_mb(model_dir: str | os.PathLike) -> float:
    """Size on disk (MB, 1e6 bytes) of the weight files in ``model_dir``.

    Counts ``*.safetensors``, ``*.onnx`` (+ external ``*.data``), ``*.bin`` and ``*.gguf`` files in
    the folder itself (not checkpoints or sub-folders): the bytes a user must ship to serve the model.
    """
    total = 0
    for p in Path(model_dir).iterdir():
        if p.is_file() and p.suffix in (".safetensors", ".onnx", ".bin", ".data", ".gguf"):
            total += p.stat().st_size
    return total / 1e6
