"""What a prunable decoder looks like: Llama-family causal LMs and their config keys.

Depth, width and vocabulary pruning of decoders (``decoder_depth``, ``decoder_width``,
``decoder_vocab``) work on the Llama layout that Llama, Mistral and Qwen2 share:
``model.model.layers[i]`` with ``self_attn.{q,k,v,o}_proj`` (grouped-query attention:
``num_key_value_heads`` KV heads, each shared by ``num_attention_heads / num_key_value_heads``
query heads of ``head_dim``), ``mlp.{gate,up,down}_proj`` (SwiGLU) and RMSNorms. Every pruned
model is rebuilt from a plain config of the same class (:func:`rebuild`), so the output is a
normal folder that ``AutoModelForCausalLM.from_pretrained`` reloads with no custom code.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

SUPPORTED_DECODERS = ("llama", "mistral", "qwen2")
"""``model_type`` values whose layout the decoder pruning steps know."""


class DecoderPruneError(ValueError):
    """The decoder cannot be pruned as asked (the message says why, naming the flag)."""


def check_decoder_config(config: dict[str, Any], where: str) -> None:
    """Raise unless ``config`` (a ``config.json`` as a dict) is a supported Llama-family causal LM.

    Args:
        config: The model's config.
        where: What to name in the message (the ``--model`` value).
    """
    kind = config.get("model_type")
    if kind not in SUPPORTED_DECODERS:
        raise DecoderPruneError(f"--model {where}: decoder pruning supports the Llama layout "
                                f"({', '.join(SUPPORTED_DECODERS)}); got model_type {kind!r}")
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise DecoderPruneError(f"--model {where}: decoder pruning keeps a causal LM; this folder is {archs[0]}")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a ``*ForCausalLM``, in order."""
    return model.model.layers


def head_layout(config: Any) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` of a decoder config (object or dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    heads, kv = int(get("num_attention_heads")), int(get("num_key_value_heads") or get("num_attention_heads"))
    head_dim = get("head_dim") or int(get("hidden_size")) // heads
    return heads, kv, int(head_dim)


PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
"""Config lists with one entry per decoder layer (Qwen2's ``layer_types``, ...)."""

_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)\.")


def rebuild(model: torch.nn.Module, state: dict[str, torch.Tensor], keep_layers: list[int] | None = None,
            **config_changes: Any) -> torch.nn.Module:
    """A new model of ``model``'s class with ``config_changes``, loaded (strictly) from ``state``.

    ``state`` holds the new tensors under the ORIGINAL names; with ``keep_layers`` only those
    layers are kept, renumbered 0..n-1 (``layers.{old}.`` -> ``layers.{new}.``), and the config's
    ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow. The result has the
    original's dtype, device and train/eval mode; tied embeddings stay tied.
    """
    cfg = model.config
    n = int(cfg.num_hidden_layers)
    changes = dict(config_changes)
    if keep_layers is not None:
        keep_layers = sorted(keep_layers)
        renum = {old: new for new, old in enumerate(keep_layers)}
        kept_state = {}
        for k, v in state.items():
            m = _LAYER_KEY.search(k)
            if m is None:
                kept_state[k] = v
            elif int(m.group(2)) in renum:
                new_key = k[:m.start(2)] + str(renum[int(m.group(2))]) + k[m.end(2):]
                kept_state[new_key] = v
        state = kept_state
        changes["num_hidden_layers"] = len(keep_layers)
        for key in PER_LAYER_KEYS:  # per-layer lists follow the layers
            value = getattr(cfg, key, None)
            if isinstance(value, list) and len(value) == n and key not in changes:
                changes[key] = [value[i] for i in keep_layers]
    new_cfg = type(cfg).from_dict({**cfg.to_dict(), **changes})
    param = next(model.parameters())
    new = type(model)(new_cfg).to(dtype=param.dtype)
    if getattr(new_cfg, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied_head = ["lm_head.weight"] if getattr(new_cfg, "tie_word_embeddings", False) else []
    if unexpected or [k for k in missing if k not in tied_head]:
        raise DecoderPruneError(f"rebuilt model does not match the pruned weights (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(param.device).train(model.training)
