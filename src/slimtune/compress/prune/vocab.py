"""Vocabulary pruning: keep only the tokens a task corpus uses, remap embeddings and tokenizer.

For MiniLM-L6 the 30,522 x 384 word-embedding matrix is 11.7M of the 22.7M parameters; SST-2
uses about 11.5k of those tokens. Kept tokens keep their relative order (new id = rank of the
old id among the kept ones), so ``[PAD]`` stays 0 and ``new_to_old`` maps ids back (used to
feed an unpruned teacher during distillation).

Tokenization of corpus text is unchanged: WordPiece is greedy longest-match-first, and every
piece it chose on the corpus is still in the vocabulary, while no new, longer piece was added.
Text outside the corpus may split differently: single characters (and ``##`` + character)
are kept by default so unseen words break into smaller known pieces rather than ``[UNK]``.
Only WordPiece tokenizers (the BERT family) are supported; the result is a ``tokenizer.json``
+ ``vocab.txt`` that plain ``AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import collections
import json
import os
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from slimtune.data.datasets import DataError, load_classification


class VocabPruneError(ValueError):
    """The tokenizer or model cannot be vocabulary-pruned (the message says why)."""


def read_corpus_texts(paths: Sequence[str | os.PathLike], encoding: str = "utf-8") -> list[str]:
    """All texts of the corpus files: text (and text-pair) columns of CSV/TSV/JSONL, lines of .txt."""

    texts: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: vocabulary corpus file not found")
        if p.suffix.lower() == ".txt":
            texts.extend(line for line in p.read_text(encoding=encoding).splitlines() if line.strip())
            continue
        d = load_classification(p, require_labels=False, encoding=encoding)
        texts.extend(d.texts)
        if d.pairs:
            texts.extend(d.pairs)
    return texts


def _wordpiece_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabPruneError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend; "
                              "vocabulary pruning needs a WordPiece tokenizer.json")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "WordPiece":
        raise VocabPruneError(f"vocabulary pruning supports WordPiece tokenizers (BERT family); "
                              f"this one is {spec.get('model', {}).get('type')!r}")
    return spec


def token_counts(tokenizer: Any, texts: Iterable[str], batch: int = 4096) -> collections.Counter[int]:
    """How often each token id occurs when ``texts`` are tokenized (special tokens excluded)."""
    counts: collections.Counter[int] = collections.Counter()
    texts = list(texts)
    for s in range(0, len(texts), batch):
        for ids in tokenizer(texts[s:s + batch], add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def kept_token_ids(tokenizer: Any, texts: Iterable[str], *, min_count: int = 1,
                   keep_chars: bool = True) -> list[int]:
    """Sorted old ids to keep: special/added tokens, corpus tokens seen ``min_count``+ times,
    and (``keep_chars``) every printable-ASCII single character with its ``##`` form.

    ``min_count > 1`` drops rare tokens too: smaller, but rare corpus words then split
    differently (identical tokenization of the corpus is guaranteed only for ``min_count=1``).
    """
    vocab = tokenizer.get_vocab()
    keep = {i for i, c in token_counts(tokenizer, texts).items() if c >= min_count}
    keep.update(tokenizer.all_special_ids)
    keep.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    if keep_chars:
        for ch in string.printable.strip():
            for tok in (ch, "##" + ch):
                if tok in vocab:
                    keep.add(vocab[tok])
    return sorted(keep)


def pruned_tokenizer_json(spec: dict[str, Any], keep_ids: Sequence[int]) -> dict[str, Any]:
    """``tokenizer.json`` content with only ``keep_ids`` (renumbered 0..k-1 in old-id order)."""
    old_vocab: dict[str, int] = spec["model"]["vocab"]
    by_id = {i: t for t, i in old_vocab.items()}
    old_to_new = {old: new for new, old in enumerate(keep_ids)}
    unk = spec["model"].get("unk_token")
    if unk is not None and old_vocab.get(unk) not in old_to_new:
        raise VocabPruneError(f"the unknown token {unk!r} must be kept")
    spec = json.loads(json.dumps(spec))  # deep copy
    spec["model"]["vocab"] = {by_id[old]: new for old, new in old_to_new.items()}
    for tok in spec.get("added_tokens", []):
        if tok["id"] not in old_to_new:
            raise VocabPruneError(f"added token {tok['content']!r} (id {tok['id']}) must be kept")
        tok["id"] = old_to_new[tok["id"]]
    post = spec.get("post_processor") or {}
    for entry in (post.get("special_tokens") or {}).values():  # TemplateProcessing
        entry["ids"] = [old_to_new[i] for i in entry["ids"]]
    for key in ("cls", "sep"):  # BertProcessing: ["[CLS]", 101]
        if isinstance(post.get(key), list):
            post[key][1] = old_to_new[post[key][1]]
    if spec.get("padding") and "pad_id" in spec["padding"]:
        spec["padding"]["pad_id"] = old_to_new.get(spec["padding"]["pad_id"], 0)
    return spec


def save_pruned_tokenizer(tokenizer: Any, keep_ids: Sequence[int], out_dir: str | os.PathLike) -> Any:
    """Write the pruned tokenizer (tokenizer.json, vocab.txt, configs) and return it reloaded."""

    spec = pruned_tokenizer_json(_wordpiece_json(tokenizer), keep_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out)


def prune_embeddings(model: torch.nn.Module, keep_ids: Sequence[int], new_pad_id: int | None) -> None:
    """Keep only rows ``keep_ids`` of the input embeddings (in place); update the config."""
    emb = model.get_input_embeddings()
    if model.get_output_embeddings() is not None:
        raise VocabPruneError("vocabulary pruning supports encoders with a task head "
                              "(no output embedding matrix); this model has one")
    idx = torch.tensor(list(keep_ids), dtype=torch.long, device=emb.weight.device)
    new = torch.nn.Embedding(len(keep_ids), emb.embedding_dim, padding_idx=new_pad_id,
                             device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(emb.weight.index_select(0, idx))  # (k, hidden)
    model.set_input_embeddings(new)
    model.config.vocab_size = len(keep_ids)
    if new_pad_id is not None:
        model.config.pad_token_id = new_pad_id


def prune_vocabulary(model: torch.nn.Module, tokenizer: Any, texts: Iterable[str], out_dir: str | os.PathLike,
                     *, min_count: int = 1, keep_chars: bool = True) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """Prune ``model``'s vocabulary (in place) to what ``texts`` use; write the tokenizer.

    Returns ``(new_tokenizer, new_to_old, info)``: the reloaded tokenizer saved in ``out_dir``,
    a LongTensor mapping each new id to its old id, and a summary for metrics.json.
    """
    _wordpiece_json(tokenizer)  # fail early on unsupported tokenizers
    texts = list(texts)
    old_size = model.get_input_embeddings().num_embeddings
    keep = kept_token_ids(tokenizer, texts, min_count=min_count, keep_chars=keep_chars)
    if max(keep) >= old_size:
        raise VocabPruneError(f"tokenizer id {max(keep)} is outside the model's {old_size} embeddings")
    new_tok = save_pruned_tokenizer(tokenizer, keep, out_dir)
    prune_embeddings(model, keep, new_tok.pad_token_id)
    info = {"vocab_size_before": old_size, "vocab_size_after": len(keep), "min_count": min_count,
            "keep_chars": keep_chars, "corpus_texts": len(texts)}
    return new_tok, torch.tensor(keep, dtype=torch.long), info
