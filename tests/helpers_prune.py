"""Tiny in-process models and data for the pruning tests (no download)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ["the", "movie", "film", "was", "is", "not", "good", "bad", "great", "dull", "fun", "act",
         "bor", "charm", "story", "plot", "very", "and", "a", "it"]
SUFFIXES = ["##ing", "##s", "##ed", "##ly"]
CHARS = list("abcdefghijklmnopqrstuvwxyz.,!'")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    """Specials, single characters, ##characters, whole words, suffixes (~100 tokens)."""
    return SPECIALS + CHARS + ["##" + c for c in CHARS if c.isalpha()] + WORDS + SUFFIXES


def make_classifier_dir(path: Path, *, heads: int = 4, hidden: int = 32, layers: int = 2,
                        intermediate: int = 64, seed: int = 0) -> Path:
    """Save a random tiny BertForSequenceClassification + WordPiece tokenizer under ``path``."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(seed)
    vocab = tiny_vocab()
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
                     num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    model = BertForSequenceClassification(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tsv(path: Path, n: int = 64, seed: int = 0, words: list[str] | None = None) -> Path:
    """A sentence/label TSV of random short phrases over ``words`` (label: 'good' or 'great' in it)."""
    rng = random.Random(seed)
    words = words or ["the", "movie", "film", "was", "not", "good", "bad", "great", "dull", "boring", "acting", "charming", "stories"]
    lines = ["sentence\tlabel"]
    for _ in range(n):
        ws = rng.choices(words, k=rng.randint(3, 9))
        lines.append(f"{' '.join(ws)}\t{int('good' in ws or 'great' in ws)}")
    path.write_text("\n".join(lines) + "\n")
    return path
