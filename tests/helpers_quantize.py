"""Tiny in-process models, tokenizer and data for the quantization tests (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("good great fine nice lovely superb bad awful poor boring dull weak the a film movie plot "
         "acting was is and but very not").split()


def tiny_bert(vocab_size: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
              labels: int = 2) -> torch.nn.Module:
    """A random BertForSequenceClassification small enough for unit tests."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64,
                     num_labels=labels, id2label={i: f"c{i}" for i in range(labels)},
                     label2id={f"c{i}": i for i in range(labels)},
                     architectures=["BertForSequenceClassification"])
    return BertForSequenceClassification(cfg).eval()


def tiny_tokenizer(tmp: Path):
    """A WordPiece tokenizer over WORDS (vocab < 64)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"), model_max_length=64)


def tiny_model_dir(tmp: Path, seed: int = 0) -> Path:
    """A plain HF classifier folder (config with id2label, safetensors, tokenizer)."""
    d = tmp / "tiny-model"
    tok = tiny_tokenizer(tmp / "vocab")
    model = tiny_bert(seed=seed)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_eval_tsv(tmp: Path, n: int = 40, seed: int = 0) -> Path:
    """A GLUE-style TSV (sentence, label) with labels c0/c1."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        words = rng.sample(WORDS, k=rng.randint(3, 12))
        lines.append(f"{' '.join(words)}\tc{rng.randint(0, 1)}")
    p = tmp / "eval.tsv"
    p.write_text("\n".join(lines) + "\n")
    return p
