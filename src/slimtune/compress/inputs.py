"""Checks the compression commands share, run before any weight is loaded.

``slimtune prune`` and ``slimtune quantize`` compress *sequence classifiers*: loading a causal
LM folder with ``AutoModelForSequenceClassification`` would silently bolt a random head onto it
and write a classifier nobody asked for, so such a folder is refused with the reason, read
from its ``config.json`` (``architectures`` / ``model_type``).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from slimtune.config.fields import RecipeError
from slimtune.models.loading import ALIASES, ModelError, check_exists

# Packaged aliases (slimtune.models.loading.ALIASES) that are causal LMs: known without
# converting their weights (smollm2: SmolLM2-135M-Instruct).
DECODER_ALIASES = frozenset({"smollm2"})
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def causal_lm_reason(config: dict) -> str | None:
    """Why a ``config.json`` (as a dict) describes a causal LM, or None for an encoder/classifier."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return None
    head = next((a for a in archs if a.endswith(_LM_HEADS)), None)
    if head is not None:
        return f"a causal language model ({head})"
    mt = config.get("model_type")
    if not archs and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return f"a causal language model (model_type {mt!r})"
    return None


def check_classifier_model(name: str, command: str, *, allow_aliases: bool = True) -> None:
    """Raise a one-line error unless ``name`` is a classifier folder (or an encoder alias).

    Args:
        name: The ``--model`` value: a folder, or a packaged alias when ``allow_aliases``.
        command: The command, for the message (``prune``).
        allow_aliases: Accept the packaged encoder aliases (``minilm``, ``minilm-l3``); their
            package is checked cheaply (no weights read), naming what to install.

    Raises:
        RecipeError: not a folder, or a causal-LM folder/alias.
        ModelError: an alias whose package is missing, or a folder without ``config.json``.
    """
    why = f"`slimtune {command}` compresses sequence classifiers only (fine-tune one first: slimtune finetune)"
    if allow_aliases and name in ALIASES:
        if name in DECODER_ALIASES:
            raise RecipeError(f"--model {name}: a causal language model; {why}")
        check_exists(name)
        return
    p = Path(name)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        if allow_aliases and not p.exists():
            aliases = ", ".join(a for a in ALIASES if a not in DECODER_ALIASES)
            raise RecipeError(f"--model {name}: no such model folder, and not an alias ({aliases})")
        raise ModelError(f"{p}: not a model folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{cfg_path}: invalid JSON ({e})") from None
    reason = causal_lm_reason(config if isinstance(config, dict) else {})
    if reason is not None:
        raise RecipeError(f"--model {name}: {reason}; {why}")


def is_causal_lm_folder(name: str) -> bool:
    """Whether ``name`` is a causal-LM alias or a folder whose ``config.json`` says so (no weights read)."""
    if name in DECODER_ALIASES:
        return True
    cfg = Path(name) / "config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else None
    except ValueError:
        return False
    return isinstance(config, dict) and causal_lm_reason(config) is not None


def check_file(flag: str, path: str | None) -> None:
    """Raise ``RecipeError`` ``'--flag PATH: file not found'`` unless ``path`` is None or a file."""
    if path is not None and not Path(path).is_file():
        raise RecipeError(f"{flag} {path}: file not found")
