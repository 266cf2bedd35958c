"""Vocabulary pruning of a decoder with a byte-level BPE tokenizer, exact on the task's text.

SmolLM2-135M's tied 49,152 x 576 embedding table is 28.3M of its 134.5M weights (21%), and its
lm_head (the same matrix) is most of the FLOPs of a decode step at this size. A task uses a
small part of it. What is kept:

1. every token the task text uses (the training and evaluation files as the model sees them:
   chat rendered with the template, prompts as generation builds them);
2. the added/special tokens (and every id the config or generation config names);
3. the 256 byte-level base tokens, so any text still encodes (unseen words fall back to
   shorter pieces, at worst bytes, never to an unknown token);
4. the closure of BPE merge ancestors: for every kept token, both parts of every merge that
   produces it, recursively.

Exactly the merges whose two parts and result are all kept are kept, in their original order.
Why the task text then tokenizes identically: BPE applies, in each pre-tokenized word, the
lowest-rank merge among adjacent pairs, until none applies. Every token that appears while the
original tokenizer works on task text is part of a final token's merge tree, so it is kept (4),
and so is every merge the original applies (its parts and result are such tokens). The pruned
merge list is a subset of the original in the same order that contains the merge the original
picks at each step, so that merge is still the lowest-rank one available: every step, hence
the result, is the same. Decoding maps the same tokens to the same bytes.

Ids are renumbered in their old order (new id = rank among the kept ids), so the added tokens
that lead SmolLM2's vocabulary keep their ids; ``new_to_old`` maps back (the unpruned teacher
is fed old ids during distillation, and its logits are read at the kept ids). The model's
embedding rows are sliced (a tied ``lm_head`` follows; an untied one is sliced too), so before
any training the pruned model's logits are exactly the original's at the kept ids.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from slimtune.compress.prune.decoder_arch import DecoderPruneError

SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


def _has_byte_level(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(n) for n in node.get("pretokenizers", node.get("decoders", [])) or [])


def bpe_spec(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.json`` of a byte-level BPE tokenizer, or a DecoderPruneError saying why not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DecoderPruneError(f"vocabulary pruning needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise DecoderPruneError(f"decoder vocabulary pruning supports byte-level BPE tokenizers; this one is "
                                f"{model.get('type')!r}")
    if not (_has_byte_level(spec.get("pre_tokenizer")) and _has_byte_level(spec.get("decoder"))):
        raise DecoderPruneError("decoder vocabulary pruning supports byte-level BPE (GPT-2 style ByteLevel "
                                "pre-tokenizer and decoder); this BPE tokenizer is not byte-level")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise DecoderPruneError("decoder vocabulary pruning supports plain byte-level BPE (no subword prefix/suffix, "
                                "no BPE dropout)")
    return spec


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def _merge_kept(m: Any, kept: set[str]) -> bool:
    a, b = _merge_pair(m)
    return a in kept and b in kept and a + b in kept


def kept_ids(spec: dict[str, Any], used: Iterable[int], extra: Iterable[int] = ()) -> list[int]:
    """Sorted old ids to keep: ``used`` + ``extra`` + added tokens + byte-level base tokens + merge ancestors."""
    vocab: dict[str, int] = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    keep = {int(i) for i in used} | {int(i) for i in extra}
    keep |= {int(t["id"]) for t in spec.get("added_tokens", [])}
    keep |= {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    unknown = sorted(i for i in keep if i not in by_id and i not in {t["id"] for t in spec.get("added_tokens", [])})
    if unknown:
        raise DecoderPruneError(f"token id {unknown[0]} is not in the tokenizer's vocabulary")
    producers: dict[str, list[tuple[str, str]]] = {}
    for m in spec["model"]["merges"]:
        a, b = _merge_pair(m)
        producers.setdefault(a + b, []).append((a, b))
    stack = [by_id[i] for i in keep if i in by_id]
    seen = set(stack)
    while stack:
        for a, b in producers.get(stack.pop(), []):
            for part in (a, b):
                if part not in seen and part in vocab:
                    seen.add(part)
                    keep.add(vocab[part])
                    stack.append(part)
    return sorted(keep)


def pruned_bpe_json(spec: dict[str, Any], keep: Sequence[int]) -> dict[str, Any]:
    """``tokenizer.json`` content with only ``keep`` (renumbered 0..k-1 in old-id order) and their merges."""
    old_to_new = {old: new for new, old in enumerate(keep)}
    out = copy.deepcopy(spec)
    model = out["model"]
    model["vocab"] = {t: old_to_new[i] for t, i in spec["model"]["vocab"].items() if i in old_to_new}
    kept_tokens = set(model["vocab"])
    model["merges"] = [m for m in spec["model"]["merges"] if _merge_kept(m, kept_tokens)]
    for tok in out.get("added_tokens", []):
        if tok["id"] not in old_to_new:
            raise DecoderPruneError(f"added token {tok['content']!r} (id {tok['id']}) must be kept")
        tok["id"] = old_to_new[tok["id"]]
    post = out.get("post_processor") or {}
    for entry in (post.get("special_tokens") or {}).values():  # TemplateProcessing
        entry["ids"] = [old_to_new[i] for i in entry["ids"]]
    for node in post.get("processors", []) or []:  # Sequence of processors
        for entry in (node.get("special_tokens") or {}).values():
            entry["ids"] = [old_to_new[i] for i in entry["ids"]]
    if out.get("padding") and "pad_id" in out["padding"]:
        out["padding"]["pad_id"] = old_to_new.get(out["padding"]["pad_id"], 0)
    return out


def save_pruned_tokenizer(tokenizer: Any, spec: dict[str, Any], out_dir: str | os.PathLike) -> Any:
    """Write ``tokenizer``'s files with ``spec`` as ``tokenizer.json`` into ``out_dir``; return it reloaded."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for stale in ("vocab.json", "merges.txt"):  # slow-tokenizer files would describe the old vocabulary
        (out / stale).unlink(missing_ok=True)
    new = AutoTokenizer.from_pretrained(out)
    if new.pad_token is None and tokenizer.pad_token is not None:
        new.pad_token = tokenizer.pad_token
    return new


def _remap(value: Any, old_to_new: dict[int, int]) -> Any:
    if isinstance(value, list):
        return [old_to_new[int(v)] for v in value]
    return None if value is None else old_to_new[int(value)]


def config_special_ids(model: torch.nn.Module) -> set[int]:
    """Every token id the model's config and generation config name (bos, eos, pad, ...)."""
    ids: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in SPECIAL_ID_KEYS:
            v = getattr(cfg, key, None) if cfg is not None else None
            ids.update(int(x) for x in (v if isinstance(v, list) else [v]) if x is not None)
    return ids


def prune_embeddings(model: torch.nn.Module, keep: Sequence[int]) -> None:
    """Keep rows ``keep`` of the embedding (and of an untied lm_head) in place; remap config ids."""
    old_to_new = {old: new for new, old in enumerate(keep)}
    idx = torch.tensor(list(keep), dtype=torch.long)
    emb = model.get_input_embeddings()
    new_emb = torch.nn.Embedding(len(keep), emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight.index_select(0, idx.to(emb.weight.device)))
        if head is not None and not tied:
            new_head = torch.nn.Linear(head.in_features, len(keep), bias=head.bias is not None,
                                       device=head.weight.device, dtype=head.weight.dtype)
            new_head.weight.copy_(head.weight.index_select(0, idx.to(head.weight.device)))
            if head.bias is not None:
                new_head.bias.copy_(head.bias.index_select(0, idx.to(head.weight.device)))
            model.set_output_embeddings(new_head)
    model.set_input_embeddings(new_emb)
    model.config.vocab_size = len(keep)
    if tied:
        model.tie_weights()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for key in SPECIAL_ID_KEYS:
            if cfg is not None and getattr(cfg, key, None) is not None:
                setattr(cfg, key, _remap(getattr(cfg, key), old_to_new))


def prune_decoder_vocab(model: torch.nn.Module, tokenizer: Any, used: Iterable[int],
                        out_dir: str | os.PathLike) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """Keep the tokens ``used`` (+ specials, bytes, merge ancestors); prune ``model`` in place.

    Returns ``(new_tokenizer, new_to_old, info)``: the reloaded tokenizer saved in ``out_dir``,
    a LongTensor mapping each new id to its old id, and a summary for metrics.json.
    """
    spec = bpe_spec(tokenizer)
    used = set(used)
    old_size = model.get_input_embeddings().num_embeddings
    keep = kept_ids(spec, used, config_special_ids(model))
    if keep[-1] >= old_size:
        raise DecoderPruneError(f"tokenizer id {keep[-1]} is outside the model's {old_size} embeddings")
    new_spec = pruned_bpe_json(spec, keep)
    new_tok = save_pruned_tokenizer(tokenizer, new_spec, out_dir)
    prune_embeddings(model, keep)
    info = {"vocab_size_before": old_size, "vocab_size_after": len(keep), "task_tokens": len(used),
            "merges_before": len(spec["model"]["merges"]), "merges_after": len(new_spec["model"]["merges"]),
            "kept": "task tokens + added/special tokens + 256 byte-level base tokens + BPE merge ancestors"}
    return new_tok, torch.tensor(keep, dtype=torch.long), info
