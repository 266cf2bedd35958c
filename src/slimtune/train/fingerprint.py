"""What a checkpoint was trained on, so a resume continues the same run or stops saying what changed.

Every checkpoint folder holds ``fingerprint.json``: the resolved recipe, flattened to dotted keys,
with every value that names a local file or folder replaced by the identity of its content:

- a **file** (``data.train``, ``data.eval``, ``distill.unlabeled``...): its size and the SHA-256
  of all its bytes (moving or renaming a data file is fine; editing one line is not);
- a **folder** (``model.name``, ``distill.student``): the name, size and SHA-256 of its
  config/tokenizer/sidecar files, and for each weight file (``*.safetensors``, ``*.onnx``...)
  its size and the SHA-256 of its first and last MiB (a safetensors header and its first and
  last tensors: any retrained or re-exported model differs there), so a 15 GB model is not read
  in full at every start;
- anything else (a hub id, a packaged alias like ``minilm``, a number) as it is.

The loop adds what it derives (``loop.examples``, ``loop.batches_per_epoch``, the batch and
optimizer settings) and checks the saved position against the data before it takes a step.

Keys in :data:`HARMLESS` are left out: they change what is observed or how fast, never the
sequence of weights (``train.eval_every`` moves the evaluations, which pick the best checkpoint
among those evaluated, but not the trajectory; ``train.fsdp`` and the number of processes do
not change it either: their checkpoints are interchangeable). ``output`` is left out so a run
folder can move. ``train.max_steps`` and ``train.epochs`` are kept: they shape the LR schedule.
Anything else that differs stops the resume with one line naming the keys, and how to start
fresh: ``--no-resume`` (``train.resume=false``), or a new ``--output``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from slimtune.config.fields import RecipeError

FILENAME = "fingerprint.json"
VERSION = 1

# Recipe keys that never change the weights a step produces (see the module docstring).
HARMLESS = frozenset({
    "output", "overwrite", "train.resume", "train.progress", "train.log_every", "train.tensorboard",
    "train.save_every", "train.keep_checkpoints", "train.num_threads", "train.eval_batch_size",
    "train.eval_every", "train.fsdp", "train.ddp_find_unused_parameters", "distill.cache_dir",
})

_FULL_HASH_MAX = 8 << 20  # folder files up to 8 MiB are hashed whole (configs, tokenizers)
_EDGE = 1 << 20  # larger ones: size + first and last MiB
_FOLDER_FILES = ("config.json", "generation_config.json", "slimtune_method.json", "quantization.json",
                 "adapter_config.json", "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json")
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".bin", ".pt", ".pth", ".gguf", ".model")


class ResumeError(RecipeError):
    """The checkpoint in the output folder was written by a different run (or cannot be resumed)."""


def _sha256_file(path: Path, edges_only: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if edges_only:
            h.update(f.read(_EDGE))
            f.seek(max(0, path.stat().st_size - _EDGE))
            h.update(f.read(_EDGE))
        else:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def file_identity(path: str | os.PathLike) -> str:
    """``"file <size> bytes sha256:<hex>"``: the whole content of a data file."""
    p = Path(path)
    return f"file {p.stat().st_size} bytes sha256:{_sha256_file(p)}"


def folder_identity(path: str | os.PathLike) -> str:
    """``"folder sha256:<hex>"`` over a model folder's config, tokenizer and weight files.

    Small files are hashed whole; weight files over 8 MiB by size plus their first and last MiB.
    Outputs that evaluation or training leave in a folder (metrics, logs, checkpoints) are ignored.
    """
    d = Path(path)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if not p.is_file():
            continue
        weights = p.suffix in _WEIGHT_SUFFIXES
        if not (weights or p.name in _FOLDER_FILES or p.name.startswith("tokenizer")):
            continue
        size = p.stat().st_size
        edges = weights and size > _FULL_HASH_MAX
        h.update(f"{p.name}\0{size}\0{_sha256_file(p, edges_only=edges)}\0".encode())
    return f"folder sha256:{h.hexdigest()}"


def _identity(value: Any) -> Any:
    """A path's content identity; any other value unchanged."""
    if not isinstance(value, str) or not value or "\n" in value:
        return value
    p = Path(value).expanduser()
    try:
        if p.is_file():
            return file_identity(p)
        if p.is_dir():
            return folder_identity(p)
    except OSError:  # unreadable: the run itself will say so
        return value
    return value


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_fingerprint(tree: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a resolved recipe (``Recipe.to_dict()``): dotted keys, paths as content.

    Args:
        tree: The nested recipe dict (sections of plain values).

    Returns:
        ``{dotted key: value or content identity}`` without the :data:`HARMLESS` keys.
    """
    out: dict[str, Any] = {}
    for key, value in _flatten(tree).items():
        if key in HARMLESS or key.startswith("provenance."):  # provenance: where defaults came from
            continue
        out[key] = [_identity(v) for v in value] if isinstance(value, (list, tuple)) else _identity(value)
    return out


def _show(v: Any) -> str:
    if isinstance(v, str) and v.startswith(("file ", "folder ")):
        return v.split(" ")[0] + " " + v.rsplit(":", 1)[-1][:12]
    return repr(v)


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """``"train.lr 0.0005 -> 0.001; data.train: content changed"``: what differs, in one line."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == b:
            continue
        if isinstance(a, str) and isinstance(b, str) and a.startswith(("file ", "folder ")) \
                and b.split(" ")[0] == a.split(" ")[0]:
            parts.append(f"{key}: content changed ({_show(a)} -> {_show(b)})")
        else:
            parts.append(f"{key} {_show(a)} -> {_show(b)}")
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def read_fingerprint(ckpt: Path) -> dict[str, Any] | None:
    """The fingerprint saved in checkpoint folder ``ckpt`` (None: none saved, an older slimtune)."""
    p = ckpt / FILENAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data.get("values") if isinstance(data, dict) and data.get("version") == VERSION else None


def write_fingerprint(folder: Path, values: dict[str, Any]) -> None:
    """Write ``fingerprint.json`` into a checkpoint folder being assembled."""
    (folder / FILENAME).write_text(json.dumps({"version": VERSION, "values": values}, indent=1, sort_keys=True))


def check_same_run(ckpt: Path, current: dict[str, Any], *, recipe_only: bool = False) -> None:
    """Raise ResumeError (one line) unless checkpoint ``ckpt`` was written by the run ``current`` describes.

    Args:
        ckpt: A ``step-*`` checkpoint folder.
        current: This run's fingerprint.
        recipe_only: Leave out the loop's derived ``loop.*`` values (checked before the data is
            tokenized, when they are not known yet).
    """
    saved = read_fingerprint(ckpt)
    fresh = "start fresh with --no-resume (train.resume=false; discards these checkpoints) or use a new --output"
    if saved is None:
        raise ResumeError(f"{ckpt}: this checkpoint records no fingerprint of its run (written by an older "
                          f"slimtune), so it cannot be resumed safely; {fresh}")
    if recipe_only:
        saved = {k: v for k, v in saved.items() if not k.startswith("loop.")}
        current = {k: v for k, v in current.items() if not k.startswith("loop.")}
    if saved != current:
        raise ResumeError(f"{ckpt}: cannot resume, the run changed since this checkpoint: "
                          f"{describe_changes(saved, current)}; {fresh}")
