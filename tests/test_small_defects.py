"""Two of issue #20's smaller defects: a non-finite evaluation result stops the run (it was written
into metrics.jsonl as a bare NaN, which is not JSON), and artifacts get the umask's modes (they
were created 0600 / 0700 by the temp-file-then-rename writes)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import load_classification, tokenize_classification
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
