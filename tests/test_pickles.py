"""Only safetensors (and ONNX) are loaded unless the user passes ``--allow-pickle``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from slimtune.cli.main import main
from slimtune.models.loading import ModelError, load_model


@pytest.fixture()
def pickle_dir(tmp_path: Path) -> Path:
    """A tiny BERT classifier folder whose weights are only ``pytorch_model.bin`` (a pickle)."""
    src = tiny.make_tiny_bert(tmp_path / "st")
    d = tmp_path / "pickled"
    shutil.copytree(src, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    return d


@pytest.fixture(autouse=True)
def _no_pickle_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start without the opt-in and restore the environment afterwards (main() sets it)."""
    monkeypatch.setenv("SLIMTUNE_ALLOW_PICKLE", "0")


def test_pickle_only_folder_is_refused_with_one_line(pickle_dir: Path) -> None:
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: pickle weights are not loaded.*--allow-pickle"):
        load_model(str(pickle_dir), "classification")


def test_evaluate_refuses_pickles_exit_2(pickle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tiny.write_tsv(tmp_path / "e.tsv", tiny.sentiment_rows(8))
    assert main(["evaluate", "--model", str(pickle_dir), "--eval", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0] and "--allow-pickle" in err[0]
    assert not (pickle_dir / "metrics.json").exists()


def test_allow_pickle_loads_the_same_weights(pickle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny.write_tsv(tmp_path / "e.tsv", tiny.sentiment_rows(8))
    assert main(["--allow-pickle", "evaluate", "--model", str(pickle_dir), "--eval", str(data)]) == 0
    assert os.environ["SLIMTUNE_ALLOW_PICKLE"] == "1"
    model = load_model(str(pickle_dir), "classification")
    ref = load_model(str(pickle_dir.parent / "st"), "classification")
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_safetensors_folder_loads_without_the_flag(tmp_path: Path) -> None:
    d = tiny.make_tiny_bert(tmp_path / "m")
    assert load_model(str(d), "classification").config.num_labels == 2


def test_serve_refuses_pickle_only_folder_exit_2(pickle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fastapi")
    assert main(["serve", "--model", str(pickle_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin" in err[0] and "--allow-pickle" in err[0]


def test_generate_refuses_pickle_only_peft_adapter(tmp_path: Path) -> None:
    """A PEFT adapter folder with only adapter_model.bin: PEFT would torch.load it; refused first."""
    peft = pytest.importorskip("peft")
    from slimtune.runtime.generate import load_for_generation

    base = tiny.make_tiny_llama(tmp_path / "base")
    lm = peft.get_peft_model(load_model(str(base), "causal-lm"),
                             peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    lm.peft_config["default"].base_model_name_or_path = str(base)
    lm.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    with pytest.raises(ModelError, match=r"adapter_model\.bin: pickle weights are not loaded"):
        load_for_generation(tmp_path / "adapter")
