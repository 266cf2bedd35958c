"""A transformers tokenizer as GGUF tokenizer metadata (llama.cpp's ``gpt2`` byte-level BPE model).

What is written (the keys llama.cpp reads): ``tokenizer.ggml.model`` ``gpt2``; ``.pre``, the
pre-tokenizer name that selects llama.cpp's split regexes; ``.tokens`` (one per embedding row,
``[PAD<i>]`` for rows no token uses); ``.token_type`` (normal, control for special added tokens,
user-defined for other added tokens, unused); ``.merges``; the bos/eos/unk/padding ids;
``add_bos_token`` / ``add_eos_token`` as the HF tokenizer really behaves (measured on a word,
not read from a flag that transformers 5 may not store); and ``tokenizer.chat_template``.

The pre-tokenizer name is read from ``tokenizer.json``'s structure: llama.cpp implements a fixed
set of split regexes, so a pre-tokenizer not listed in :data:`PRE_TOKENIZERS` is refused (or
named with ``--pre-tokenizer``); the export check then compares llama.cpp's tokens with the HF
tokenizer's on the check prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gguf

from slimtune.models.loading import ModelError

# The Split regexes of two common byte-level BPE families, as their tokenizer.json spells them.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace("\\p{N}{1,3}", "\\p{N}")
# llama.cpp pre-tokenizer name -> what it means, for the docs and errors
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with the GPT-2 regex",
    "smollm": "Digits(individual) then ByteLevel with the GPT-2 regex (SmolLM, StarCoder)",
    "llama-bpe": "Split(Llama-3 regex) then ByteLevel without regex",
    "qwen2": "Split(Qwen2 regex) then ByteLevel without regex",
}


@dataclass
class GgufVocab:
    """Everything GGUF stores about a tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _pieces(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tok_json: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer equivalent to ``tokenizer.json``'s, or None if none is known."""
    parts = _pieces(tok_json.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}.get(regex)
    return None


def _adds(tokenizer: Any, token_id: int | None) -> tuple[bool, bool]:
    """Whether encoding plain text adds ``token_id`` at the start / the end, as the HF tokenizer does."""
    if token_id is None:
        return False, False
    with_special = tokenizer("hello world")["input_ids"]
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)
    return extra > 0 and with_special[0] == token_id, extra > 0 and with_special[-1] == token_id


def _first_id(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if isinstance(v, int) and v >= 0:
            return v
    return None


def build_vocab(tokenizer: Any, config: Any, n_rows: int, pre: str | None = None) -> GgufVocab:
    """The GGUF vocabulary of ``tokenizer`` for a model whose embedding has ``n_rows`` rows.

    Args:
        tokenizer: a transformers fast tokenizer (byte-level BPE).
        config: the model config (fallback bos/eos ids).
        n_rows: embedding rows; GGUF needs one token per row.
        pre: llama.cpp pre-tokenizer name; None reads it from the tokenizer.

    Raises:
        ModelError: not a byte-level BPE tokenizer, a pre-tokenizer llama.cpp has no equivalent
            for, a normalizer, or more tokens than embedding rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{type(tokenizer).__name__}: a slow tokenizer; GGUF export needs the fast one (tokenizer.json)")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer")):
        raise ModelError(f"a {model.get('type')} tokenizer: GGUF export writes byte-level BPE tokenizers only")
    if tj.get("normalizer"):
        raise ModelError(f"tokenizer.json normalizer {tj['normalizer'].get('type')}: llama.cpp's BPE tokenizer "
                         "applies none, so GGUF tokens would differ")
    name = pre or pre_tokenizer_name(tj)
    if name is None:
        raise ModelError(f"tokenizer.json pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:120]}: no llama.cpp "
                         f"equivalent known here ({', '.join(PRE_TOKENIZERS)}); pass --pre-tokenizer NAME")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise ModelError(f"the tokenizer has token id {max(vocab.values())} but the embedding only {n_rows} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {"bos": _first_id(tokenizer.bos_token_id, getattr(config, "bos_token_id", None)),
           "eos": _first_id(tokenizer.eos_token_id, getattr(config, "eos_token_id", None)),
           "unk": _first_id(tokenizer.unk_token_id), "pad": _first_id(tokenizer.pad_token_id)}
    add_bos, _ = _adds(tokenizer, ids["bos"])
    _, add_eos = _adds(tokenizer, ids["eos"])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return GgufVocab(tokens, [int(t) for t in types], merges, name, {k: v for k, v in ids.items() if v is not None},
                     add_bos, add_eos, template)


def add_vocab(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """Write ``vocab``'s keys into ``writer``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, token_id in vocab.special_ids.items():
        setters[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
