"""The one builder of tiny random models, tokenizers and data files for the tests (no network).

Every tiny model of the suite is built here, in-process and seeded (a few KB each):

- :func:`bert_classifier` / :func:`llama_lm`: in-memory ``BertForSequenceClassification`` /
  ``LlamaForCausalLM``; every size is a keyword, so each test states what it depends on.
- :func:`make_tiny_bert` / :func:`make_tiny_llama`: the same saved as HF folders with a tokenizer.
- :func:`sentiment_rows`, :func:`keyword_rows`, :func:`random_label_rows` + :func:`write_tsv` /
  :func:`write_csv`; :func:`write_corpus` for causal-LM text.

``tests/conftest.py`` exposes them as cached session fixtures; torchrun workers
(``helpers_distributed.py``) import this module directly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("good great fine nice love happy bad awful poor hate sad boring movie film plot actor "
         "story scene the a an is was and but very not really quite").split()
POSITIVE = {"good", "great", "fine", "nice", "love", "happy"}
NEGATIVE = {"bad", "awful", "poor", "hate", "sad", "boring"}
# The default WordPiece vocabulary of make_tiny_bert (36 tokens).
BERT_VOCAB = [*SPECIALS, *WORDS, ",", "."]
# The default word-level vocabulary of make_tiny_llama (34 tokens).
LLAMA_VOCAB = ["<unk>", "<s>", "</s>", *WORDS, ",", "."]

# The pruning tests need subword pieces and single characters (vocabulary pruning falls back
# to them): specials, characters, ##characters, whole words, suffixes (85 tokens).
PRUNE_WORDS = ["the", "movie", "film", "was", "is", "not", "good", "bad", "great", "dull", "fun", "act",
               "bor", "charm", "story", "plot", "very", "and", "a", "it"]
PRUNE_SUFFIXES = ["##ing", "##s", "##ed", "##ly"]
PRUNE_CHARS = list("abcdefghijklmnopqrstuvwxyz.,!'")
PRUNE_VOCAB = SPECIALS + PRUNE_CHARS + ["##" + c for c in PRUNE_CHARS if c.isalpha()] + PRUNE_WORDS + PRUNE_SUFFIXES
PRUNE_TSV_WORDS = ["the", "movie", "film", "was", "not", "good", "bad", "great", "dull", "boring", "acting",
                   "charming", "stories"]

# The quantization tests' vocabulary (29 tokens, inside the 64-row embedding of quant_bert).
QUANT_WORDS = ("good great fine nice lovely superb bad awful poor boring dull weak the a film movie plot "
               "acting was is and but very not").split()
QUANT_VOCAB = [*SPECIALS, *QUANT_WORDS]


# --------------------------------------------------------------------------------------------
# Models (in memory)
# --------------------------------------------------------------------------------------------


def bert_classifier(*, vocab_size: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4,
                    intermediate: int | None = None, max_positions: int = 64, num_labels: int = 2,
                    id2label: dict[int, str] | None = None, seed: int = 0, **config: Any):  # noqa: ANN201
    """A seeded random ``BertForSequenceClassification`` (train mode, as transformers builds it).

    ``intermediate`` defaults to ``2 * hidden``; ``id2label`` also sets ``label2id``; any other
    ``BertConfig`` field (dropout probabilities, ``architectures``...) goes through ``config``.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if id2label is not None:
        config.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
                     num_labels=num_labels, **config)
    return BertForSequenceClassification(cfg)


def llama_lm(*, vocab_size: int = 100, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
             intermediate: int | None = None, max_positions: int = 64, seed: int = 0, **config: Any):  # noqa: ANN201
    """A seeded random ``LlamaForCausalLM``; ``intermediate`` defaults to ``2 * hidden``.

    Other ``LlamaConfig`` fields (``tie_word_embeddings``, token ids, per-layer lists such as
    ``layer_types``) go through ``config``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, **config)
    return LlamaForCausalLM(cfg)


def tiny_model(arch: str, layers: int = 2):  # noqa: ANN201
    """The method tests' model: ``"bert"`` classifier (labels neg/pos) or ``"llama"`` causal LM, 100 tokens."""
    if arch == "bert":
        return bert_classifier(layers=layers, id2label={0: "neg", 1: "pos"})
    return llama_lm(layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def quant_bert(*, vocab_size: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               labels: int = 2):  # noqa: ANN201
    """The quantization tests' classifier (hidden 64, labels c0, c1, ...), in eval mode."""
    return bert_classifier(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, seed=seed,
                           num_labels=labels, id2label={i: f"c{i}" for i in range(labels)},
                           architectures=["BertForSequenceClassification"]).eval()


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def write_vocab(path: Path, vocab: list[str] | None = None) -> Path:
    """A WordPiece ``vocab.txt``, one token a line (default: BERT's special tokens and WORDS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab or BERT_VOCAB) + "\n")
    return path


def bert_tokenizer(vocab: list[str] | None = None, **kw: Any):  # noqa: ANN201
    """A lower-casing WordPiece ``BertTokenizerFast`` over ``vocab`` (ids in list order)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab or BERT_VOCAB)}, do_lower_case=True, **kw)


def word_tokenizer(vocab_list: list[str] | None = None):  # noqa: ANN201
    """A whitespace word-level fast tokenizer over ``vocab_list`` (default :data:`LLAMA_VOCAB`,
    which starts with ``<unk>``, ``<s>``, ``</s>``: ids 0, 1, 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocab_list or LLAMA_VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# --------------------------------------------------------------------------------------------
# Model folders (weights + tokenizer)
# --------------------------------------------------------------------------------------------


def make_tiny_bert(out: Path, num_labels: int = 2, layers: int = 2, hidden: int = 32, *,
                   vocab: list[str] | None = None, vocab_txt: bool = True, **model_kw: Any) -> Path:
    """Save a tiny random BertForSequenceClassification + WordPiece tokenizer folder to ``out``.

    The embedding has exactly one row per ``vocab`` token (default :data:`BERT_VOCAB`), also
    written as ``vocab.txt`` unless ``vocab_txt`` is false; ``model_kw`` goes to
    :func:`bert_classifier` (heads, seed, id2label, dropout, ...).
    """
    vocab = vocab or BERT_VOCAB
    out.mkdir(parents=True, exist_ok=True)
    if vocab_txt:
        write_vocab(out / "vocab.txt", vocab)
    tok = bert_tokenizer(vocab)
    model = bert_classifier(vocab_size=len(vocab), hidden=hidden, layers=layers, num_labels=num_labels, **model_kw)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_llama(out: Path, layers: int = 2, hidden: int = 32, *, vocab: list[str] | None = None,
                    **model_kw: Any) -> Path:
    """Save a tiny random LlamaForCausalLM (tied embeddings) + word-level tokenizer folder to ``out``.

    One embedding row per ``vocab`` token (default :data:`LLAMA_VOCAB`); ``model_kw`` goes to
    :func:`llama_lm` (and overrides the defaults here: 128 positions, tied, bos 1, eos 2).
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(vocab)
    kw = {"max_positions": 128, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, **model_kw}
    llama_lm(vocab_size=len(tok.get_vocab()), hidden=hidden, layers=layers, **kw).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_prune_bert(out: Path, *, heads: int = 4, hidden: int = 32, layers: int = 2, intermediate: int = 64,
                    seed: int = 0) -> Path:
    """The pruning tests' classifier folder: the character-level :data:`PRUNE_VOCAB`, labels '0'/'1'."""
    return make_tiny_bert(out, layers=layers, hidden=hidden, vocab=PRUNE_VOCAB, vocab_txt=False, heads=heads,
                          intermediate=intermediate, seed=seed, id2label={0: "0", 1: "1"})


def quant_tokenizer(tmp: Path):  # noqa: ANN201
    """The quantization tests' WordPiece tokenizer over :data:`QUANT_VOCAB` (also written as
    ``tmp/vocab.txt``), 64 tokens at most.

    Built from the token list, not ``vocab_file=``: transformers 5 ignores that argument and
    leaves only the special tokens, so every word would be ``[UNK]``.
    """
    write_vocab(tmp / "vocab.txt", QUANT_VOCAB)
    return bert_tokenizer(QUANT_VOCAB, model_max_length=64)


def make_quant_bert(tmp: Path, seed: int = 0) -> Path:
    """A plain HF classifier folder ``tmp/tiny-model`` (config with id2label, safetensors, tokenizer)."""
    d = tmp / "tiny-model"
    tok = quant_tokenizer(tmp / "vocab")
    quant_bert(seed=seed).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Learnable toy sentiment data: label 1 iff the text has more positive words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        rows.append((" ".join(words), int(pos > neg)))
    return rows


def keyword_rows(n: int, seed: int = 0, words: list[str] | None = None) -> list[tuple[str, int]]:
    """Random short phrases over ``words`` (default :data:`PRUNE_TSV_WORDS`); label 1 iff 'good' or 'great' is in."""
    rng = random.Random(seed)
    words = words or PRUNE_TSV_WORDS
    rows = []
    for _ in range(n):
        ws = rng.choices(words, k=rng.randint(3, 9))
        rows.append((" ".join(ws), int("good" in ws or "great" in ws)))
    return rows


def random_label_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Phrases over :data:`QUANT_WORDS` with random labels c0/c1 (an eval file, not a task)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(QUANT_WORDS, k=rng.randint(3, 12))
        rows.append((" ".join(words), f"c{rng.randint(0, 1)}"))
    return rows


def separable_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """An easy, linearly separable task: 2-8 words, all positive (label 1) or all negative (0); balanced."""
    rng = random.Random(seed)
    pos, neg = sorted(POSITIVE), sorted(NEGATIVE)
    rows = [(" ".join(rng.choice(pos if i % 2 else neg) for _ in range(rng.randint(2, 8))), i % 2)
            for i in range(n)]
    rng.shuffle(rows)
    return rows


def write_tsv(path: Path, rows: list[tuple[str, Any]], header: str = "sentence\tlabel") -> Path:
    path.write_text(header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


def write_csv(path: Path, rows: list[tuple[str, Any]], header: tuple[str, str] = ("text", "label")) -> Path:
    """A CSV with a header row, quoted where needed (csv module)."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
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
