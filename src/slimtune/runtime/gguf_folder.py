"""Folders whose weights are a GGUF file run by llama.cpp (what ``slimtune quantize`` writes for a
decoder when llama.cpp is the fastest backend): ``model.gguf`` beside the HF ``config.json`` and
tokenizer, and a ``gguf.json`` sidecar.

The HF tokenizer renders and tokenizes prompts (the same ids slimtune's torch path uses); the
GGUF's own vocabulary is the same one, so llama.cpp runs those ids directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimtune.data.chat import Message
from slimtune.models.loading import ModelError, load_tokenizer
from slimtune.runtime.generate import Generation, SamplingConfig, prompt_ids
from slimtune.runtime.llamacpp import LlamaCppModel, llamacpp_available

GGUF_FILE = "model.gguf"
GGUF_SIDECAR = "gguf.json"


def is_gguf_folder(path: str | os.PathLike) -> bool:
    """A folder holding ``model.gguf`` and no transformers weights."""
    p = Path(path)
    return (p / GGUF_FILE).is_file() and not any(p.glob("*.safetensors"))


def open_gguf_folder(path: str | os.PathLike, *, threads: int = 0, n_ctx: int = 2048) -> tuple[LlamaCppModel, Any]:
    """``(llama.cpp model, HF tokenizer)`` of a GGUF folder.

    Raises:
        ModelError: llama-cpp-python is not installed, or the folder has no tokenizer.
    """
    p = Path(path)
    if not llamacpp_available():
        raise ModelError(f"{p}: its weights are {GGUF_FILE}, run by llama.cpp; install llama-cpp-python "
                         f"(scripts/install.sh builds it)")
    if not (p / "tokenizer_config.json").is_file():
        raise ModelError(f"{p}: no tokenizer beside {GGUF_FILE}")
    side = p / GGUF_SIDECAR
    info = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
    return LlamaCppModel(p / info.get("file", GGUF_FILE), n_threads=threads, n_ctx=n_ctx), load_tokenizer(str(p))


def generate_text_gguf(model: LlamaCppModel, tokenizer: Any, prompts: Sequence[str | list[Message]],
                       cfg: SamplingConfig, *, chat_template: bool = True,
                       on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
    """:func:`slimtune.runtime.generate.generate_text` for a llama.cpp model (one prompt at a time)."""
    out = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(tokenizer, p, chat_template=chat_template)
        cb = (lambda t, i=i: on_text(i, t)) if on_text is not None else None
        out.append(model.generate(ids, cfg, on_text=cb)[0])
    return out
