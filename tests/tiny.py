"""Tiny random models and data files built in-process (no network, a few KB each)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("good great fine nice love happy bad awful poor hate sad boring movie film plot actor "
         "story scene the a an is was and but very not really quite").split()
POSITIVE = {"good", "great", "fine", "nice", "love", "happy"}


def tiny_model(arch: str, layers: int = 2):  # noqa: ANN201 (transformers imported lazily)
    """A seeded in-memory tiny model: ``"bert"`` classifier (2 labels) or ``"llama"`` causal LM."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "bert":
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2,
                         id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def write_vocab(path: Path) -> Path:
    """A WordPiece vocab with BERT's special tokens and the words above."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(specials + WORDS + [",", "."]) + "\n")
    return path


def make_tiny_bert(out: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32) -> Path:
    """Save a tiny random BertForSequenceClassification + tokenizer folder to ``out``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(out / "vocab.txt")
    words = vocab.read_text().split()
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=64,
                     num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, layers: int = 2, hidden: int = 32) -> Path:
    """Save a tiny random LlamaForCausalLM + word-level fast tokenizer folder to ``out``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS, ",", "."])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Learnable toy sentiment data: label 1 iff the text has more positive words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in {"bad", "awful", "poor", "hate", "sad", "boring"} for w in words)
        rows.append((" ".join(words), int(pos > neg)))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, int]], header: str = "sentence\tlabel") -> Path:
    path.write_text(header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def write_corpus(path: Path, n_words: int = 3000, seed: int = 0) -> Path:
    """Repetitive toy text, so a tiny LM can lower its perplexity quickly."""
    rng = random.Random(seed)
    phrases = ["the movie was very good .", "the plot is not bad , but boring .",
               "an actor and a story .", "really great film , love the scene ."]
    text = []
    while len(" ".join(text).split()) < n_words:
        text.append(rng.choice(phrases))
        if rng.random() < 0.1:
            text.append("\n\n")
    path.write_text(" ".join(text))
    return path
