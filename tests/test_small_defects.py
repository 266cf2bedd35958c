"""Issue #20's smaller defects: a non-finite evaluation result stops the run (it was written into
metrics.jsonl as a bare NaN, which is not JSON); artifacts get the umask's modes (they were created
0600 / 0700 by the temp-file-then-rename writes); U+2028 inside a JSONL string or a TSV/CSV field
is data, not a line break; integer labels {0, 2} are two classes (no phantom "1" that an eval
file could then use); non-UTF-8 input names the line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import (
    DataError,
    load_classification,
    read_rows,
    tokenize_classification,
)
from slimtune.io import atomic_dir, atomic_write_text
from slimtune.methods import get_method
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train.loop import NonFiniteLossError, train


def _strict_json(line: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_nan_evaluation_stops_the_run_and_is_never_logged(tiny_bert_dir: Path, tiny_assets, tmp_path: Path) -> None:
    tok = load_tokenizer(str(tiny_bert_dir))
    data = tokenize_classification(load_classification(tiny_assets.tsv(32, seed=1)), tok, 32)
    model = load_model(str(tiny_bert_dir), "classification", label_names=["0", "1"])
    cfg = TrainConfig(batch_size=8, lr=1e-3, tensorboard=False, progress=False, eval_every=2, log_every=1)
    calls = [0]

    def eval_fn(_: torch.nn.Module) -> dict:
        calls[0] += 1
        return {"loss": 0.5 if calls[0] == 1 else float("nan")}

    m = get_method("full")
    with pytest.raises(NonFiniteLossError, match=r"evaluation loss is nan at step 4.*step-0000002"):
        train(model, m, m.config_cls(), data, cfg, tmp_path, total_steps=8, eval_fn=eval_fn, metric="loss")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines and all(_strict_json(ln) for ln in lines)
    assert not any("eval/loss" in ln and _strict_json(ln)["step"] == 4 for ln in lines)


def test_artifacts_get_the_umask_modes(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c"])
def test_unicode_line_separators_inside_values_are_data(tmp_path: Path, sep: str) -> None:
    text = f"a great{sep}film"
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": text, "label": 1}, ensure_ascii=False) + "\n"
                  + json.dumps({"text": "bad", "label": 0}) + "\n", encoding="utf-8")
    tsv = tmp_path / "d.tsv"
    tsv.write_text(f"sentence\tlabel\n{text}\t1\nbad\t0\n", encoding="utf-8")
    csv_ = tmp_path / "d.csv"
    csv_.write_text(f'text,label\r\n"{text}",1\r\nbad,0\r\n', encoding="utf-8")
    for path in (jl, tsv, csv_):
        data = load_classification(path)
        assert data.texts == [text, "bad"], path
        assert [line for line, _ in read_rows(path)[1]] == [1, 2] if path is jl else [2, 3]


def test_integer_labels_0_and_2_are_two_classes(tmp_path: Path) -> None:
    train_f = tmp_path / "t.tsv"
    train_f.write_text("sentence\tlabel\ngood\t2\nbad\t0\nfine\t2\n")
    data = load_classification(train_f)
    assert data.label_names == ["0", "2"] and data.labels == [1, 0, 1]
    ev = tmp_path / "e.tsv"
    ev.write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"e\.tsv:2: .*'1'"):
        load_classification(ev, label_names=data.label_names)
    dense = tmp_path / "dense.tsv"  # {0, 1} keep their ids
    dense.write_text("sentence\tlabel\na\t1\nb\t0\n")
    assert load_classification(dense).label_names == ["0", "1"]


def test_non_utf8_input_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "l1.tsv"
    p.write_bytes("sentence\tlabel\ngood\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l1\.tsv:3: not valid utf-8 text.*data\.encoding"):
        load_classification(p)
    assert load_classification(p, encoding="latin-1").texts == ["good", "café"]
