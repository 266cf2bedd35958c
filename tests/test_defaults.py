"""Method-aware and data-aware defaults (issue #23): declared per method, used only when the user
gives nothing, ``data.max_length: auto`` from the data, every source recorded in ``recipe.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slimtune.cli.main import main
from slimtune.config.defaults import FALLBACK, method_defaults
from slimtune.config.recipe import TrainConfig, resolve
from slimtune.methods import get_method, method_names
from slimtune.train.auto import auto_max_length, nearest_rank
from slimtune.train.loop import plan_steps


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_every_method_declares_its_defaults_and_they_are_used_when_unset():
    for name in method_names():
        declared = method_defaults(get_method(name), "classification")
        assert "train.lr" in declared, f"method {name} declares no default learning rate"
        r = resolve({"method": {"name": name}})
        assert r.train.lr == declared["train.lr"]
        assert r.train.min_steps == declared.get("train.min_steps", FALLBACK["train.min_steps"])
        assert r.provenance["train.lr"] == {"value": declared["train.lr"], "source": f"default of method {name}"}
    assert resolve({"method": {"name": "lora"}}).train.lr == 10 * resolve({}).train.lr  # lora 1e-3, full 1e-4
    causal = resolve({"model": {"task": "causal-lm"}, "method": {"name": "lora"}})
    assert causal.train.lr == 2e-4 and causal.train.min_steps == 0  # per-task override of lora's defaults


def test_a_user_value_always_wins_over_the_method_default(tmp_path, capsys, tiny_bert_dir, tiny_assets):
    base = ["finetune", "--model", str(tiny_bert_dir), "--train", str(tiny_assets.tsv(24)), "--method", "ia3"]
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": 0.125}}))
    for extra, lr in ((["--lr", "3e-5"], 3e-5), (["--config", str(cfg)], 0.125), (["train.lr=7e-4"], 7e-4)):
        printed = _printed([*base, *extra], capsys)
        assert printed["train"]["lr"] == lr, extra
        assert printed["provenance"]["train.lr"] == {"value": lr, "source": "user"}, extra
    assert _printed(base, capsys)["train"]["lr"] == get_method("ia3").defaults["train.lr"]
    # the step floor is the method's only when the run length is too; given epochs run as given
    printed = _printed([*base, "--epochs", "1"], capsys)
    assert printed["train"]["min_steps"] == 0 and printed["train"]["epochs"] == 1.0
    assert _printed(base, capsys)["train"]["min_steps"] == get_method("ia3").defaults["train.min_steps"]
    assert resolve({"method": {"name": "lora"}, "train": {"lr": 0.5, "min_steps": 3}}).train.min_steps == 3


def test_step_floor_in_plan_steps():
    assert plan_steps(100, TrainConfig(batch_size=10, epochs=1, min_steps=25)) == 25  # floor: 2.5 epochs
    assert plan_steps(100, TrainConfig(batch_size=10, epochs=3, min_steps=25)) == 30  # epochs: above the floor
    assert plan_steps(100, TrainConfig(batch_size=10, max_steps=7, min_steps=25)) == 7  # max_steps: exact
    assert plan_steps(100, TrainConfig(batch_size=10)) == 30  # unset epochs and floor: 3 epochs, no floor


def test_auto_max_length_by_hand():
    assert nearest_rank([5] * 98 + [40, 41]) == 40  # ceil(0.99 * 100) = 99th of 100 sorted
    assert nearest_rank([5] * 99 + [40]) == 5
    assert auto_max_length([[5] * 98 + [40, 41]], cap=512) == 40
    assert auto_max_length([[5] * 98 + [41, 41]], cap=512) == 48  # rounded up to a multiple of 8
    assert auto_max_length([[5] * 99 + [40]], cap=512) == 8
    assert auto_max_length([[5] * 99 + [40], [30]], cap=512) == 32  # the eval file's lengths count too
    assert auto_max_length([[600] * 10], cap=512) == 512  # capped by the model


def _file(path: Path, short: int, long: int) -> str:
    """``short`` rows of one word and ``long`` rows of 20 words (tiny BERT: 1 token a word + [CLS] [SEP])."""
    rows = ["good\t1"] * short + [" ".join(["bad"] * 20) + "\t0"] * long
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return str(path)


def test_auto_max_length_from_a_fixed_file(tmp_path, capsys, tiny_bert_dir):
    base = ["finetune", "--model", str(tiny_bert_dir)]
    # 98 rows of 3 tokens, 2 of 22: the 99th of 100 sorted lengths is 22 -> 24
    printed = _printed([*base, "--train", _file(tmp_path / "a.tsv", 98, 2)], capsys)
    assert printed["data"]["max_length"] == 24
    assert printed["provenance"]["data.max_length"]["source"].startswith("auto: 99th-percentile token length 22")
    # 99 rows of 3 tokens, 1 of 22: the 99th is 3 -> 8
    assert _printed([*base, "--train", _file(tmp_path / "b.tsv", 99, 1)], capsys)["data"]["max_length"] == 8
    # ... unless the eval file's own 99th percentile is longer
    printed = _printed([*base, "--train", str(tmp_path / "b.tsv"), "--eval", _file(tmp_path / "c.tsv", 1, 9)], capsys)
    assert printed["data"]["max_length"] == 24
    # a number given is used as it is
    printed = _printed([*base, "--train", str(tmp_path / "a.tsv"), "--max-length", "12"], capsys)
    assert printed["data"]["max_length"] == 12 and printed["provenance"].get("data.max_length") is None


def test_provenance_is_saved_in_recipe_yaml_and_read_back(tmp_path, capsys, tiny_bert_dir):
    out = tmp_path / "run"
    train = _file(tmp_path / "a.tsv", 30, 2)
    assert main(["finetune", "--model", str(tiny_bert_dir), "--train", train, "--method", "lora",
                 "--output", str(out), "--batch-size", "16", "--min-steps", "9", "train.tensorboard=false"]) == 0
    err = capsys.readouterr().err
    assert "train.lr = 0.001 (default of method lora)" in err  # printed at the start
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    prov = saved["provenance"]
    assert saved["train"]["lr"] == 1e-3 and prov["train.lr"]["source"] == "default of method lora"
    assert prov["train.min_steps"] == {"value": 9, "source": "user"}
    assert saved["data"]["max_length"] == 24 and prov["data.max_length"]["source"].startswith("auto: ")
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 9  # the floor, not 3 epochs x 2 steps
    # read back: the same values, and the sources the first run recorded
    again = _printed(["finetune", "--config", str(out / "recipe.yaml")], capsys)
    assert again["train"]["lr"] == 1e-3 and again["data"]["max_length"] == 24
    assert again["provenance"]["train.lr"]["source"] == "default of method lora"
    assert again["provenance"]["data.max_length"] == prov["data.max_length"]


def test_lr_auto_runs_a_range_test_and_records_the_curve(tmp_path, capsys, tiny_bert_dir):
    train = _file(tmp_path / "a.tsv", 30, 2)
    base = ["finetune", "--model", str(tiny_bert_dir), "--train", train, "--lr", "auto"]
    printed = _printed(base, capsys)
    assert printed["train"]["lr"] == "auto" and printed["provenance"]["train.lr"]["source"].startswith("auto: lr range")
    out = tmp_path / "run"
    assert main([*base, "--output", str(out), "--max-steps", "2", "--batch-size", "8", "train.tensorboard=false"]) == 0
    curve = json.loads((out / "metrics.json").read_text())["lr_find"]
    assert 2 <= curve["steps"] == len(curve["lrs"]) == len(curve["losses"]) <= 100
    assert curve["lrs"] == sorted(curve["lrs"]) and curve["lr"] == pytest.approx(curve["lr_at_min_loss"] / 10, rel=1e-2)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["train"]["lr"] == curve["lr"] and saved["provenance"]["train.lr"]["source"].startswith("auto: lr range")
    assert main(["distill", "--teacher", str(tiny_bert_dir), "--train", train, "--student-layers", "1",
                 "--lr", "auto", "--print-config"]) == 2  # finetune only


@pytest.mark.parametrize("row, task", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "causal-lm"),
    ({"instruction": "say", "input": "", "output": "yo"}, "causal-lm"),
    ({"prompt": "say", "completion": "yo"}, "causal-lm"),
    ({"text": "a b", "label": 1}, "classification"),
])
def test_task_is_inferred_from_the_data_when_not_given(tmp_path, row, task):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(row) + "\n")
    r = resolve({"model": {"name": "minilm"}, "data": {"train": str(train)}})
    assert r.model.task == task
    assert ("model.task" in r.provenance) == (task == "causal-lm")
    given = resolve({"model": {"name": "minilm", "task": "classification"}, "data": {"train": str(train)}})
    assert given.model.task == "classification" and "model.task" not in given.provenance


def test_text_for_a_causal_model_folder_is_causal_lm(tmp_path, tiny_llama_dir, tiny_bert_dir):
    train = tmp_path / "corpus.txt"
    train.write_text("some words here\n")
    assert resolve({"model": {"name": str(tiny_llama_dir)}, "data": {"train": str(train)}}).model.task == "causal-lm"
    assert resolve({"model": {"name": str(tiny_bert_dir)}, "data": {"train": str(train)}}).model.task == "classification"
