"""Reading task data, tokenizing it once, and batching it with little padding.

Classification files are CSV, TSV or JSONL with a text column, an optional second text column
(sentence pairs) and a label column; names are auto-detected or given. Causal-LM data is raw
text, tokenized, concatenated and cut into blocks of ``max_length`` tokens.

Batches are built per epoch from ``(seed, epoch)`` alone, so a resumed run sees exactly the
batches the interrupted one would have seen. With ``group_by_length`` examples of similar
length share a batch (HF's LengthGroupedSampler idea): on SST-2 this cuts padded tokens by
several times, which is most of slimtune's training speed-up over a random-batch loop.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""


TEXT_NAMES = ["text", "sentence", "sentence1", "#1 String", "text_a", "question1", "premise",
              "review", "content", "tweet", "document"]
PAIR_NAMES = ["text_pair", "sentence2", "#2 String", "text_b", "question2", "hypothesis"]
LABEL_NAMES = ["label", "labels", "Quality", "sentiment", "category", "class", "target", "y"]


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def _set_csv_limit() -> None:
    # News articles can exceed csv's default 128 KB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def read_rows(path: str | os.PathLike, encoding: str = "utf-8") -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Read a CSV/TSV/JSONL file into ``(columns, [(line_number, row_dict), ...])``.

    TSV is read with ``QUOTE_NONE`` (GLUE files have bare quotes); CSV with standard quoting.
    Raises DataError naming the file (and line) for empty files and ragged or invalid rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    suffix = p.suffix.lower()
    raw = p.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid {encoding} text ({e.reason}, byte {e.start}); "
                        f"set data.encoding (e.g. latin-1)") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{p}: file is empty")
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        columns: list[str] = []
        # split on newlines only: str.splitlines() also splits inside strings at U+2028, U+0085 ...
        for i, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{i}: expected a JSON object per line, got {type(obj).__name__}")
            for k in obj:
                if k not in columns:
                    columns.append(k)
            rows.append((i, obj))
        return columns, rows
    _set_csv_limit()
    # csv ends a record only at \r or \n (str.splitlines() would also split at U+2028 inside a field)
    if suffix == ".tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    elif suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{p}: file is empty") from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    for values in reader:
        line = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        rows.append((line, dict(zip(header, values, strict=False)) if len(values) == len(header)
                     else {"__ragged__": (len(values), len(header))}))
    if not rows:
        raise DataError(f"{p}: file has a header but no data rows")
    return header, rows


def detect_column(columns: Sequence[str], given: str | None, candidates: Sequence[str],
                  what: str, path: str | os.PathLike, required: bool = True) -> str | None:
    """Pick the column for ``what``: the given name (must exist) or the first known candidate."""
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no column {given!r} for the {what}; columns are {list(columns)}")
        return given
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in columns:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    if required:
        raise DataError(f"{path}: cannot find the {what} column among {list(columns)}; "
                        f"pass --{what.replace(' ', '-')}-column NAME")
    return None


# --------------------------------------------------------------------------------------------
# Classification data
# --------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    """Texts (and optional pairs) with integer label ids, as read from one file."""

    path: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None
    label_names: list[str]
    skipped: int = 0
    columns: dict[str, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)


def _label_key(v: Any) -> str:
    """Normalise a label value: integers in any spelling ('1', 1, 1.0, '1.0') become '1'."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = str(v).strip()
    if re.fullmatch(r"-?\d+(\.0+)?", s):
        return str(int(float(s)))
    return s


def build_label_names(raw: Sequence[str]) -> list[str]:
    """Order label names: integer labels by value (so '0','1' keep their ids), strings sorted."""
    uniq = sorted(set(raw))
    if not uniq:  # an unlabelled file
        return []
    if all(u.lstrip("-").isdigit() for u in uniq):
        # By value, and only the labels present: {0, 1} keep ids 0 and 1; {0, 2} are two classes
        # (ids 0 and 1, named "0" and "2"), never a phantom class "1" that no row has.
        return [str(i) for i in sorted(int(u) for u in uniq)]
    return uniq


def load_classification(path: str | os.PathLike, *, text_column: str | None = None,
                        text_pair_column: str | None = None, label_column: str | None = None,
                        label_names: list[str] | None = None, require_labels: bool = True,
                        skip_bad_rows: bool = False, encoding: str = "utf-8",
                        max_rows: int | None = None, seed: int = 0) -> ClassificationData:
    """Read a labelled (or unlabelled) classification file.

    Args:
        path: CSV, TSV or JSONL file.
        text_column, text_pair_column, label_column: column names, or None to auto-detect.
        label_names: the training label set; labels outside it are an error naming the line.
            None builds the set from this file (training data).
        require_labels: if False, a file without a label column is accepted (labels None).
        skip_bad_rows: count and skip malformed rows instead of raising on the first.
        encoding: text encoding of the file.
        max_rows: keep only this many rows, chosen by a seeded shuffle.
        seed: seed of that shuffle.
    """
    columns, rows = read_rows(path, encoding)
    tcol = detect_column(columns, text_column, TEXT_NAMES, "text", path)
    pcol = detect_column(columns, text_pair_column, PAIR_NAMES, "text pair", path, required=False)
    lcol = detect_column(columns, label_column, LABEL_NAMES, "label", path, required=require_labels)
    texts: list[str] = []
    pairs: list[str] | None = [] if pcol else None
    raw_labels: list[str] = []
    lines: list[int] = []
    skipped = 0
    for line, row in rows:
        try:
            if "__ragged__" in row:
                got, want = row["__ragged__"]
                raise DataError(f"{path}:{line}: row has {got} fields, header has {want}")
            text = row.get(tcol)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{line}: empty or missing text in column {tcol!r}")
            pair = None
            if pcol:
                pair = row.get(pcol)
                if not isinstance(pair, str) or not pair.strip():
                    raise DataError(f"{path}:{line}: empty or missing text in column {pcol!r}")
            label = None
            if lcol:
                value = row.get(lcol)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise DataError(f"{path}:{line}: empty or missing label in column {lcol!r}")
                label = _label_key(value)
                if label_names is not None and label not in label_names:
                    raise DataError(f"{path}:{line}: label {label!r} was not seen in training "
                                    f"(known labels: {label_names})")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        texts.append(text)
        if pairs is not None:
            pairs.append(pair)  # type: ignore[arg-type]
        if label is not None:
            raw_labels.append(label)
        lines.append(line)
    if not texts:
        raise DataError(f"{path}: no usable rows ({skipped} skipped as malformed)")
    if skipped:
        print(f"[slimtune] {path}: skipped {skipped} malformed row(s) of {len(rows)}", file=sys.stderr)
    if max_rows is not None and max_rows < len(texts):
        idx = list(range(len(texts)))
        random.Random(seed).shuffle(idx)
        idx = sorted(idx[:max_rows])
        texts = [texts[i] for i in idx]
        pairs = [pairs[i] for i in idx] if pairs is not None else None
        raw_labels = [raw_labels[i] for i in idx] if raw_labels else raw_labels
    names = label_names if label_names is not None else build_label_names(raw_labels)
    index = {n: i for i, n in enumerate(names)}
    labels = [index[v] for v in raw_labels] if lcol else None
    return ClassificationData(str(path), texts, pairs, labels, list(names), skipped,
                              {"text": tcol, "text_pair": pcol, "label": lcol})


# --------------------------------------------------------------------------------------------
# Tokenized datasets
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    """Unpadded token ids per example (and labels); what the batcher and collator consume."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int] | None  # classification labels; None for causal-LM (labels = inputs)
    pad_id: int
    causal: bool = False
    example_ids: bool = False  # collate adds an ``example_ids`` (B,) tensor (distillation looks up cached teacher outputs by it)
    pairs: bool = False  # classification rows are sentence pairs (text + text pair)
    token_labels: list[list[int]] | None = None  # per-token LM labels, -100 = no loss (chat SFT: answers only)
    position_ids: list[list[int]] | None = None  # packed rows: positions restart at 0 for each example
    info: dict[str, Any] = field(default_factory=dict)  # what the reader reports (JSON-ready counts)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def tokenize_classification(data: ClassificationData, tokenizer: Any, max_length: int) -> TokenizedData:
    """Tokenize once, without padding (padding happens per batch in :func:`collate`)."""
    enc = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length,
                    padding=False, return_attention_mask=False)
    tt = enc.get("token_type_ids")
    return TokenizedData(enc["input_ids"], tt, data.labels, _pad_id(tokenizer), pairs=data.pairs is not None)


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def read_text_files(paths: str | os.PathLike | Sequence[str | os.PathLike], encoding: str = "utf-8") -> str:
    """Concatenate raw text files (a directory means every .txt file in it, sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: file not found")
    chunks = []
    for f in files:
        try:
            chunks.append(f.read_text(encoding=encoding))
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not valid {encoding} text ({e.reason} at byte {e.start})") from None
    text = "\n\n".join(chunks)
    if not text.strip():
        raise DataError(f"{', '.join(map(str, files)) or paths}: no text")
    return text


def tokenize_causal(text: str, tokenizer: Any, block_size: int, max_blocks: int | None = None) -> TokenizedData:
    """Tokenize ``text`` and cut it into non-overlapping blocks of ``block_size`` tokens."""
    # Tokenize paragraph-sized pieces: a single 5 MB string is slow for some tokenizers.
    pieces = [p for p in text.split("\n\n") if p.strip()]
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(pieces), 2048):
        enc = tokenizer(["\n\n".join(pieces[start:start + 2048])], add_special_tokens=False)["input_ids"][0]
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
        if max_blocks is not None and len(ids) >= (max_blocks + 1) * block_size:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"text has {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(n)]
    return TokenizedData(blocks, None, None, _pad_id(tokenizer), causal=True)


def split_blocks(data: TokenizedData, eval_fraction: float) -> tuple[TokenizedData, TokenizedData]:
    """Hold out the last ``eval_fraction`` of blocks (contiguous text: no train/eval overlap)."""
    n_eval = max(1, int(round(len(data) * eval_fraction)))
    if n_eval >= len(data):
        raise DataError(f"only {len(data)} block(s) of text: too few to hold out an eval split")
    cut = len(data) - n_eval
    tr = TokenizedData(data.input_ids[:cut], None, None, data.pad_id, causal=True)
    ev = TokenizedData(data.input_ids[cut:], None, None, data.pad_id, causal=True)
    return tr, ev


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, group_by_length: bool = True) -> list[list[int]]:
    """The list of batches (lists of example indices) for one epoch; a pure function of its args.

    With ``group_by_length``: shuffle, cut into mega-chunks of 50 batches, sort each chunk by
    length, cut into batches, shuffle the batch order. Randomness is kept (which examples meet
    changes every epoch); padding is nearly gone.
    """
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        chunk = batch_size * 50
        grouped: list[int] = []
        for s in range(0, n, chunk):
            part = order[s:s + chunk]
            part.sort(key=lambda i: -lengths[i])
            grouped.extend(part)
        order = grouped
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def collate(data: TokenizedData, idx: Sequence[int]) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to the longest among them: (B, T) tensors."""
    seqs = [data.input_ids[i] for i in idx]
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), data.pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[b, : len(s)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention}
    if data.token_type_ids is not None:
        tt = torch.zeros((B, T), dtype=torch.long)
        for b, i in enumerate(idx):
            t = data.token_type_ids[i]
            tt[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        out["token_type_ids"] = tt
    if data.token_labels is not None:
        labels = torch.full((B, T), -100, dtype=torch.long)  # padding carries no loss
        for b, i in enumerate(idx):
            labels[b, : len(data.token_labels[i])] = torch.tensor(data.token_labels[i], dtype=torch.long)
        out["labels"] = labels
    elif data.causal:
        labels = input_ids.clone()
        labels[attention == 0] = -100  # padded positions carry no loss
        out["labels"] = labels
    if data.position_ids is not None:
        # Packed: no attention mask, so transformers builds a per-example causal mask from the
        # restarting positions (masking_utils.find_packed_sequence_indices). Padding keeps 0..T-1.
        pos = torch.arange(T, dtype=torch.long).repeat(B, 1)
        for b, i in enumerate(idx):
            pos[b, : len(data.position_ids[i])] = torch.tensor(data.position_ids[i], dtype=torch.long)
        out["position_ids"] = pos
        del out["attention_mask"]
    elif data.labels is not None:
        out["labels"] = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
    if data.example_ids:
        out["example_ids"] = torch.tensor(list(idx), dtype=torch.long)
    return out


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch for ``n`` examples."""
    return math.ceil(n / batch_size)
