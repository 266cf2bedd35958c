"""Data reading: formats, column detection, labels, clear errors, batching."""

from __future__ import annotations

import json

import pytest

from slimtune.data.datasets import (
    DataError,
    TokenizedData,
    collate,
    epoch_batches,
    load_classification,
)


def test_tsv_sst2_style(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text('sentence\tlabel\nit is "good\t1\nbad one\t0\n')
    d = load_classification(p)
    assert d.texts == ['it is "good', "bad one"] and d.labels == [1, 0] and d.label_names == ["0", "1"]


def test_mrpc_columns_detected(tmp_path):
    p = tmp_path / "m.tsv"
    p.write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA "x" b\tc d\n0\t3\t4\te\tf\n')
    d = load_classification(p)
    assert d.columns == {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}
    assert d.pairs == ["c d", "f"] and d.labels == [1, 0]


def test_csv_string_labels_and_jsonl(tmp_path):
    c = tmp_path / "t.csv"
    c.write_text('sentiment,confidence,text\nnegative,0.5,"a, b"\npositive,0.9,c\nneutral,1,d\n')
    d = load_classification(c)
    assert d.label_names == ["negative", "neutral", "positive"] and d.labels == [0, 2, 1]
    j = tmp_path / "t.jsonl"
    j.write_text(json.dumps({"text": "x", "label": "pos"}) + "\n\n" + json.dumps({"text": "y", "label": "neg"}) + "\n")
    d = load_classification(j)
    assert d.labels == [1, 0]


def test_integer_labels_are_ordered_by_value_without_phantom_classes(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\na\t2\nb\t0\n")
    assert load_classification(p).label_names == ["0", "2"]  # not ["0", "1", "2"]: no row has label 1


@pytest.mark.parametrize("content, match", [
    ("", "file is empty"),
    ("sentence\tlabel\n", "no data rows"),
    ("sentence\tlabel\na\t1\nb\t1\textra\n", r":3: row has 3 fields, header has 2"),
    ("sentence\tlabel\na\t1\n\t0\n", r":3: empty or missing text"),
    ("sentence\tlabel\na\t1\nb\t\n", r":3: empty or missing label"),
    ("words\tlabel\na\t1\n", "cannot find the text column"),
])
def test_bad_files_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "bad.tsv"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_classification(p)


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_classification(p)


def test_unknown_label_in_eval_names_line(tmp_path):
    p = tmp_path / "ev.tsv"
    p.write_text("text\tlabel\na\t0\nb\t7\n")
    with pytest.raises(DataError, match=r"ev.tsv:3: label '7' was not seen in training"):
        load_classification(p, label_names=["0", "1"])


def test_skip_bad_rows_counts(tmp_path, capsys):
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\na\t1\n\t0\nc\t0\td\n e\t1\n")
    d = load_classification(p, skip_bad_rows=True)
    assert d.skipped == 2 and d.texts == ["a", " e"]
    assert "skipped 2 malformed row(s)" in capsys.readouterr().err


def test_explicit_missing_column(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\na\t1\n")
    with pytest.raises(DataError, match="no column 'review'"):
        load_classification(p, text_column="review")


def test_subsample_is_seeded(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(100)))
    a = load_classification(p, max_rows=10, seed=1).texts
    assert a == load_classification(p, max_rows=10, seed=1).texts
    assert a != load_classification(p, max_rows=10, seed=2).texts and len(a) == 10


def test_epoch_batches_cover_everything_once_and_reduce_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    for group in (True, False):
        b = epoch_batches(lengths, 16, seed=0, epoch=3, group_by_length=group)
        assert sorted(i for x in b for i in x) == list(range(1000))
        assert b == epoch_batches(lengths, 16, seed=0, epoch=3, group_by_length=group)
    padded = lambda bs: sum(len(x) * max(lengths[i] for i in x) for x in bs)  # noqa: E731
    grouped = padded(epoch_batches(lengths, 16, 0, 0, group_by_length=True))
    rand = padded(epoch_batches(lengths, 16, 0, 0, group_by_length=False))
    assert grouped < 0.7 * rand
    assert epoch_batches(lengths, 16, 0, 0) != epoch_batches(lengths, 16, 0, 1)


def test_collate_pads_and_masks():
    d = TokenizedData([[5, 6, 7], [8]], [[0, 0, 1], [0]], [1, 0], pad_id=0)
    b = collate(d, [0, 1])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    lm = TokenizedData([[5, 6], [7]], None, None, pad_id=2, causal=True)
    assert collate(lm, [0, 1])["labels"].tolist() == [[5, 6], [7, -100]]
