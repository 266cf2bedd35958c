"""Output folders: what one holds, and whether a command may write into it.

Every command that writes a folder checks it here before it loads a weight or writes a byte:

- a missing or empty folder is written;
- a folder holding files slimtune did not write (no ``recipe.yaml``, ``metrics.json``,
  ``checkpoints/``, ``stage.json``, ``<command>.yaml``...) is never written into, even with
  ``--overwrite``: it may be anything (a downloaded model, a home folder);
- a **finished** run (``metrics.json``, or a model without resumable checkpoints) is replaced
  only with ``--overwrite``;
- an **unfinished** training run (``checkpoints/`` and no ``metrics.json``) is resumed
  (:mod:`slimtune.train.fingerprint` checks that it is the same run).

``--overwrite`` on a folder that is written in place (finetune, distill) clears the old run's
files (``metrics.json`` first, so a crash halfway leaves an unfinished folder, never one that
looks finished) before the new ``recipe.yaml`` is written: the folder never describes one run
while holding another's model. prune and quantize build their folder aside and swap it in whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slimtune.config.fields import RecipeError

# Files and folders slimtune writes into the top of an output folder; one of them marks a folder as ours.
MARKERS = ("recipe.yaml", "metrics.json", "metrics.jsonl", "checkpoints", "stage.json", "prune.yaml",
           "prune.json", "quantize.yaml", "compress.yaml", "compress.json", "run.yaml", "pipeline.yaml",
           "fingerprint.json", "export.yaml", "export.json")
_MODEL_FILES = ("config.json", "model.safetensors", "model.onnx", "quantization.json", "adapter")


def output_state(path: str | os.PathLike) -> str:
    """``"new"`` (missing or empty), ``"foreign"``, ``"finished"`` or ``"unfinished"``."""
    p = Path(path)
    if not p.exists():
        return "new"
    names = {c.name for c in p.iterdir() if not c.name.startswith(".")}
    if not names:
        return "new"
    if not names & set(MARKERS):
        return "foreign"
    ckpts = p / "checkpoints"
    resumable = ckpts.is_dir() and any((c / "state.json").is_file() for c in ckpts.glob("step-*"))
    if "metrics.json" in names or (names & set(_MODEL_FILES) and not resumable):
        return "finished"
    return "unfinished"


def check_output(path: str | os.PathLike, *, overwrite: bool, flag: str = "--output",
                 inputs: tuple[str | None, ...] = ()) -> str:
    """Raise RecipeError (one line) unless the command may write folder ``path``; return its state.

    Args:
        path: The output folder.
        overwrite: The user asked to replace a finished output (``--overwrite``).
        flag: How the message names the setting.
        inputs: Paths the command reads (model folders): the output may not be one of them.

    Returns:
        :func:`output_state` of the folder (``"new"``, ``"finished"`` or ``"unfinished"``).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RecipeError(f"{flag} {p}: exists and is not a folder")
    for src in inputs:
        if src and Path(src).exists() and p.resolve() == Path(src).resolve():
            raise RecipeError(f"{flag} {p}: is also an input of this run ({src}); write to another folder")
    state = output_state(p)
    if state == "foreign":
        first = sorted(c.name for c in p.iterdir() if not c.name.startswith("."))[0]
        raise RecipeError(f"{flag} {p}: holds files slimtune did not write (e.g. {first}); it is never written "
                          f"into, even with --overwrite: choose a new or empty folder")
    if state == "finished" and not overwrite:
        raise RecipeError(f"{flag} {p}: holds a finished run (metrics.json or a model); pass --overwrite to "
                          f"replace it, or choose a new {flag}")
    return state


def clear_output(path: str | os.PathLike) -> None:
    """Remove what an earlier run left in a slimtune output folder (``metrics.json`` first).

    Only a folder :func:`check_output` accepted (new, finished or unfinished) may be cleared.
    """
    p = Path(path)
    if not p.is_dir():
        return
    (p / "metrics.json").unlink(missing_ok=True)  # first: from here on the folder is unfinished
    for c in sorted(p.iterdir()):
        if c.is_dir() and not c.is_symlink():
            shutil.rmtree(c)
        else:
            c.unlink()
