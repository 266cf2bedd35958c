"""Transfer-set augmentation: new training text for distillation from the rows you have.

TinyBERT (Jiao et al., 2020) grows a task's training set about twentyfold by replacing words with
near neighbours, and lets the teacher label the new rows. Here the neighbours come from the
teacher's own input-embedding matrix (cosine nearest whole-word tokens), standing in for TinyBERT's
GloVe vectors and BERT MLM head, so it needs nothing beyond the model folder. A replacement may
change the meaning (``good`` -> ``bad``): that is fine, the rows carry no label; the teacher's
soft labels say what each new row means (``slimtune distill --unlabeled OUT.tsv``).

For sentence pairs each side is augmented on its own, and with ``swap_pairs`` the order of the
two sentences is also swapped (the original pair once, each augmented copy with probability 1/2):
symmetric tasks such as paraphrase detection should not depend on it, and the teacher says how
much it does.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.config.fields import RecipeError, check_ranges, save_settings, setting
from slimtune.data.datasets import load_classification
from slimtune.evaluate.evaluator import model_task
from slimtune.io import atomic_write_json, atomic_write_text
from slimtune.models.loading import load_model, load_tokenizer

_WORD = re.compile(r"[A-Za-z]{2,}")  # the spans that may be replaced (ASCII words, 2+ letters)


@dataclass
class AugmentConfig:
    """Settings of ``slimtune augment`` (one flag per field); written beside the output as
    ``OUTPUT.augment.yaml``, which ``slimtune augment --config`` reads back."""

    model: str | None = setting(None, "Model folder whose tokenizer and input embeddings pick the neighbours (the teacher).")
    input: str | None = setting(None, "Training file (CSV/TSV/JSONL) whose rows are augmented; its label column is ignored.")
    output: str | None = setting(None, "TSV file to write (plus OUTPUT.json with the counts and OUTPUT.augment.yaml with these settings).")
    text_column: str | None = setting(None, "Column with the text (auto-detected like data.text_column).")
    text_pair_column: str | None = setting(None, "Column with the second text of a pair (auto-detected).")
    encoding: str = setting("utf-8", "Text encoding of the input file (e.g. latin-1).")
    copies: int = setting(8, "Augmented rows written per input row (before duplicates are dropped).", ge=1)
    prob: float = setting(0.4, "Chance that each replaceable word is replaced (TinyBERT: 0.4).", gt=0, le=1)
    neighbours: int = setting(15, "Candidates per word: its nearest whole-word tokens (TinyBERT: 15).", ge=1)
    swap_pairs: bool = setting(True, "Sentence pairs: also swap the two sentences (original once, copies at random).")
    min_words: int = setting(1, "Rows with fewer replaceable words are not augmented.", ge=0)
    max_rows: int | None = setting(None, "Augment a seeded sample of this many input rows (None: all).", ge=1)
    seed: int = setting(42, "Seed of the row sample and of every replacement.")
    keep_labels: bool = setting(False, "Copy each new row's label from its input row (for a no-KD ablation only: "
                                       "a replacement can change the label, which the teacher would notice).")

    def validate(self) -> None:
        """Raise RecipeError naming the flag when a setting is missing, out of range or contradictory."""
        check_ranges(self, "--")
        for name in ("model", "input", "output"):
            if getattr(self, name) is None:
                raise RecipeError(f"--{name}: is required ({AugmentConfig.__dataclass_fields__[name].metadata['help']})")
        if not Path(self.input).is_file():  # type: ignore[arg-type]
            raise RecipeError(f"--input: file not found: {self.input}")
        if Path(self.output).resolve() == Path(self.input).resolve():  # type: ignore[arg-type]
            raise RecipeError(f"--output {self.output}: is the input file; write the augmented rows elsewhere")


def _word_tokens(tokenizer: Any) -> dict[str, int]:
    """Whole-word tokens of a vocabulary: ``{word: token id}``.

    WordPiece and word-level vocabularies count every alphabetic token that is not a ``##``
    continuation piece; BPE and SentencePiece vocabularies only tokens that start a word
    (``Ġ``/``▁`` prefix), since their bare pieces continue a word.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(backend).__name__ if backend is not None else ""
    wordpiece = kind in ("WordPiece", "WordLevel") or any(t.startswith("##") for t in vocab)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    out: dict[str, int] = {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tok in special:
            continue
        if tok[:1] in ("Ġ", "▁"):
            word = tok[1:]
        elif wordpiece and not tok.startswith("##"):
            word = tok
        else:
            continue
        if len(word) >= 2 and word.isascii() and word.isalpha():
            out.setdefault(word, i)
    return out


def word_neighbours(embeddings: Any, tokenizer: Any, words: set[str], k: int) -> dict[str, list[str]]:
    """Nearest whole-word tokens of each word by cosine similarity of the input embeddings.

    Args:
        embeddings: the model's input-embedding matrix, (vocab, hidden).
        tokenizer: its tokenizer.
        words: the words to look up (as they appear in the text; matched case-insensitively for
            lower-cased vocabularies).
        k: neighbours per word.

    Returns:
        ``{word: [neighbour, ...]}`` for the words that are one whole-word token; the others are
        absent (multi-piece words are never replaced). Neighbours that are the word itself in
        another case are skipped.
    """

    table = _word_tokens(tokenizer)
    if not table:
        return {}
    lower = bool(getattr(tokenizer, "do_lower_case", False)) or all(w == w.lower() for w in list(table)[:2000])
    forms = list(table)
    ids = torch.tensor([table[w] for w in forms], dtype=torch.long)
    emb = torch.nn.functional.normalize(embeddings.detach().float()[ids], dim=-1)  # (W, H)
    index = {w: j for j, w in enumerate(forms)}
    asked = sorted({w for w in words if (w.lower() if lower else w) in index})
    out: dict[str, list[str]] = {}
    for s in range(0, len(asked), 1024):  # (1024, W) similarity blocks
        chunk = asked[s:s + 1024]
        rows = torch.tensor([index[w.lower() if lower else w] for w in chunk])
        top = (emb[rows] @ emb.T).topk(min(k + 4, len(forms)), dim=-1).indices  # a few spare for skips
        for w, cand in zip(chunk, top.tolist(), strict=True):
            nb = [forms[c] for c in cand if forms[c].lower() != w.lower()][:k]
            if nb:
                out[w] = nb
    return out


def _match_case(new: str, old: str) -> str:
    if old.isupper():
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def augment_text(text: str, neighbours: dict[str, list[str]], prob: float, rng: random.Random) -> str:
    """Replace each replaceable word with one of its neighbours with probability ``prob``."""

    def swap(m: re.Match[str]) -> str:
        w = m.group(0)
        nb = neighbours.get(w)
        if nb is None or rng.random() >= prob:
            return w
        return _match_case(rng.choice(nb), w)

    return _WORD.sub(swap, text)


def augment_rows(texts: list[str], pairs: list[str] | None, neighbours: dict[str, list[str]],
                 cfg: AugmentConfig, sources: list[int] | None = None) -> list[tuple[str, str | None]]:
    """New rows from ``texts`` (and ``pairs``): up to ``cfg.copies`` per row, no duplicates.

    Rows equal to an input row are left out (the input is the labelled set; the new rows are the
    transfer set). When ``sources`` is a list, the index of each new row's input row is appended
    to it (one per returned row).
    """
    rng = random.Random(cfg.seed)
    idx = list(range(len(texts)))
    if cfg.max_rows is not None and cfg.max_rows < len(idx):
        idx = sorted(rng.sample(idx, cfg.max_rows))
    original = {(t, pairs[i] if pairs else None) for i, t in enumerate(texts)}
    seen: set[tuple[str, str | None]] = set(original)
    out: list[tuple[str, str | None]] = []

    def emit(row: tuple[str, str | None], src: int) -> None:
        if row not in seen:
            seen.add(row)
            out.append(row)
            if sources is not None:
                sources.append(src)

    for i in idx:
        a, b = texts[i], pairs[i] if pairs else None
        n_words = sum(w in neighbours for w in _WORD.findall(a + " " + (b or "")))
        if b is not None and cfg.swap_pairs:
            emit((b, a), i)
        if n_words < cfg.min_words:
            continue
        for _ in range(cfg.copies):
            na = augment_text(a, neighbours, cfg.prob, rng)
            nb = augment_text(b, neighbours, cfg.prob, rng) if b is not None else None
            if nb is not None and cfg.swap_pairs and rng.random() < 0.5:
                na, nb = nb, na
            emit((na, nb), i)
    return out


def _clean(s: str) -> str:
    return " ".join(s.replace("\t", " ").split())  # one TSV field: no tabs or newlines


def settings_path(output: str | Path) -> Path:
    """Where the resolved settings of an augment run are written: ``OUTPUT.augment.yaml``."""
    return Path(f"{output}.augment.yaml")


def run_augment(cfg: AugmentConfig) -> dict[str, Any]:
    """Write augmented rows of ``cfg.input`` to ``cfg.output`` (TSV, the input's text column names).

    Everything is checked, and the input read, before anything is written. The TSV is written
    atomically, with ``OUTPUT.json`` (settings, model, counts) and ``OUTPUT.augment.yaml`` (the
    resolved settings, for ``slimtune augment --config``) beside it.

    Returns:
        What ``OUTPUT.json`` holds: input, model, settings, ``rows_in``, ``rows_out``,
        ``distinct_words``, ``words_with_neighbours``, ``columns``.
    """
    cfg.validate()
    data = load_classification(cfg.input, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                               require_labels=cfg.keep_labels, encoding=cfg.encoding)
    tok = load_tokenizer(cfg.model)
    emb = load_model(cfg.model, model_task(cfg.model)).get_input_embeddings().weight
    words = {w for t in data.texts + (data.pairs or []) for w in _WORD.findall(t)}
    nbrs = word_neighbours(emb, tok, words, cfg.neighbours)
    sources: list[int] = []
    rows = augment_rows(data.texts, data.pairs, nbrs, cfg, sources)
    cols = [data.columns["text"]] + ([data.columns["text_pair"]] if data.pairs is not None else [])
    fields = [[_clean(x) for x in r if x is not None] for r in rows]
    if cfg.keep_labels:  # the label as the input wrote it (its name, not the class index)
        cols.append(data.columns["label"])
        for f, src in zip(fields, sources, strict=True):
            f.append(data.label_names[data.labels[src]])
    lines = ["\t".join(cols)] + ["\t".join(f) for f in fields]
    out = Path(cfg.output)  # type: ignore[arg-type]
    atomic_write_text(out, "\n".join(lines) + "\n")
    info = {"input": str(cfg.input), "model": str(cfg.model), "settings": dataclasses.asdict(cfg),
            "rows_in": len(data.texts), "rows_out": len(rows), "distinct_words": len(words),
            "words_with_neighbours": len(nbrs), "columns": cols}
    atomic_write_json(str(out) + ".json", info)
    save_settings(cfg, settings_path(out))
    return info


__all__ = ["AugmentConfig", "augment_rows", "augment_text", "run_augment", "settings_path", "word_neighbours"]
