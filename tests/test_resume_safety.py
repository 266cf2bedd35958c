"""Resume safety (issue #20, defects 1 and 2): a checkpoint is resumed only by the run that wrote
it, a saved position that does not fit the data stops instead of spinning, checkpoints hold no
pickle, and a finished output is replaced only with --overwrite (never a half-described folder).

An interrupted run is made in-process: the loop's ``_step`` raises after N optimizer steps (the
checkpoints written until then stay, exactly as after SIGKILL; tests/test_train.py kills a real
process). A run that would spin is stopped by SIGALRM, so old code fails instead of hanging.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny
import torch
import yaml

import slimtune.train.loop as loop_mod
from slimtune.cli.main import main
from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.methods import get_method
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train.fingerprint import ResumeError, describe_changes, recipe_fingerprint
from slimtune.train.state_file import load_state, save_state


class _Killed(Exception):
    """Stands for SIGKILL: raised by the patched loop after N steps (main() does not catch it)."""


@pytest.fixture()
def files(tiny_bert_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A private copy of the training file (some tests rewrite it), the shared model and eval file."""
    train = tiny.write_tsv(tmp_path / "train.tsv", tiny.sentiment_rows(64, seed=1))
    return {"model": tiny_bert_dir, "train": train, "eval": tiny.write_tsv(tmp_path / "eval.tsv",
                                                                          tiny.sentiment_rows(16, seed=2))}


@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail (instead of hanging the suite) if the code under test spins for 120 s."""
    def boom(*_: object) -> None:
        raise TimeoutError("the run did not finish within 120 s: it spins")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(files["model"]), "--train", str(files["train"]), "--eval", str(files["eval"]),
            "--output", str(out), "--max-steps", "12", "--lr", "1e-3", "--no-progress", "--no-tensorboard",
            "--save-every", "2", *extra]


def _interrupted(files: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch, after: int,
                 *extra: str) -> Path:
    """Run finetune until ``after`` steps are done, then 'kill' it; return the newest checkpoint."""
    real, calls = loop_mod._step, [0]

    def step(*a: object, **k: object) -> float:
        calls[0] += 1
        if calls[0] > after:
            raise _Killed
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(loop_mod, "_step", step)
        with pytest.raises(_Killed):
            main(_args(files, out, *extra))
    ckpt = loop_mod.latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and not (out / "metrics.json").exists()
    return ckpt


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("slimtune ")]
    assert len(err) == 1, err
    return err[0]


def test_changed_lr_is_refused_naming_it_and_nothing_changes(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    ckpt = _interrupted(files, out, monkeypatch, 5, "--batch-size", "8")
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    recipe_before = (out / "recipe.yaml").read_text()
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "8", "--lr", "2e-3")) == 2
    line = _one_line_error(capsys)
    assert "train.lr 0.001 -> 0.002" in line and "--no-resume" in line and "--output" in line
    assert (out / "recipe.yaml").read_text() == recipe_before  # still describes the checkpoints' run
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    # the same command as the interrupted one resumes and finishes
    assert main(_args(files, out, "--batch-size", "8")) == 0
    assert "resuming from" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from_step"] == int(ckpt.name[5:])


def test_changed_batch_size_stops_instead_of_spinning(files, tmp_path, monkeypatch, capsys, alarm) -> None:
    out = tmp_path / "run"
    _interrupted(files, out, monkeypatch, 11, "--batch-size", "4", "--max-steps", "40")  # batch 10 of 16
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "16", "--max-steps", "40")) == 2  # 4 batches per epoch
    line = _one_line_error(capsys)
    assert "train.batch_size 4 -> 16" in line


def test_changed_training_data_is_refused(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _interrupted(files, out, monkeypatch, 5, "--batch-size", "8")
    tiny.write_tsv(files["train"], tiny.sentiment_rows(64, seed=9))  # same path, other rows
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "8")) == 2
    line = _one_line_error(capsys)
    assert "data.train: content changed" in line


def test_no_resume_starts_fresh_and_drops_the_old_checkpoints(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _interrupted(files, out, monkeypatch, 5, "--batch-size", "8", "--max-steps", "40")
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "4", "--no-resume")) == 0
    assert "resuming" not in capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["resumed_from_step"] is None and m["train"]["steps"] == 12


def test_checkpoint_without_fingerprint_is_not_resumed(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    ckpt = _interrupted(files, out, monkeypatch, 5, "--batch-size", "8")
    (ckpt / "fingerprint.json").unlink()  # as written by an older slimtune
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "8")) == 2
    assert "no fingerprint" in _one_line_error(capsys)


def test_checkpoints_hold_no_pickle_and_resume_loads_none(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    ckpt = _interrupted(files, out, monkeypatch, 5, "--batch-size", "8")
    assert {p.suffix for p in ckpt.iterdir()} <= {".safetensors", ".json"}, sorted(p.name for p in ckpt.iterdir())

    def no_pickle(*a: object, **k: object) -> None:
        raise AssertionError("torch.load (a pickle) called while resuming")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert main(_args(files, out, "--batch-size", "8")) == 0
    assert "resuming from" in capsys.readouterr().err


def test_state_file_round_trips_optimizer_structure(tmp_path) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))], lr=0.1)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    obj = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "none": None, "pair": (1, 2.5)}
    save_state(tmp_path / "s.safetensors", obj)
    back = load_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"] == obj["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys stay integers
    for i in (0, 1):
        for k, v in obj["optimizer"]["state"][i].items():
            torch.testing.assert_close(back["optimizer"]["state"][i][k], v, atol=0, rtol=0)
    assert torch.equal(back["rng"], obj["rng"]) and back["none"] is None and back["pair"] == (1, 2.5)


def _direct_setup(files: dict[str, Path]) -> tuple:
    tok = load_tokenizer(str(files["model"]))
    data = tokenize_classification(load_classification(files["train"]), tok, 32)
    torch.manual_seed(0)
    model = load_model(str(files["model"]), "classification", label_names=["0", "1"])
    cfg = TrainConfig(batch_size=4, lr=1e-3, tensorboard=False, progress=False, save_every=2)
    return model, data, cfg


def test_loop_checks_the_saved_position_against_the_data(files, tmp_path, monkeypatch, alarm) -> None:
    """A library caller (no recipe fingerprint): a position past the data is refused, not spun on."""
    model, data, cfg = _direct_setup(files)
    method = get_method("full")
    mcfg = method.config_cls()
    model = method.apply(model, mcfg, None)
    real, calls = loop_mod._step, [0]

    def step(*a: object, **k: object) -> float:
        calls[0] += 1
        if calls[0] > 5:
            raise _Killed
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "_step", step)
    with pytest.raises(_Killed):
        loop_mod.train(model, method, mcfg, data, cfg, tmp_path, total_steps=30)
    monkeypatch.setattr(loop_mod, "_step", real)
    ckpt = loop_mod.latest_checkpoint(tmp_path / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    state["state"]["batch"] = 1000  # e.g. saved by a run over a larger file
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="does not fit this run"):
        loop_mod.train(model, method, mcfg, data, cfg, tmp_path, total_steps=30)
    small = tokenize_classification(load_classification(files["eval"]), load_tokenizer(str(files["model"])), 32)
    with pytest.raises(ResumeError, match=r"loop\.examples 64 -> 16"):
        loop_mod.train(model, method, mcfg, small, cfg, tmp_path, total_steps=30)


def test_fingerprint_leaves_out_harmless_keys_and_hashes_files(files, tmp_path) -> None:
    base = {"output": "a", "train": {"lr": 0.001, "log_every": 10, "progress": True}, "data": {"train": str(files["train"])},
            "model": {"name": str(files["model"])}, "provenance": {"train.lr": {"value": 0.001, "source": "x"}}}
    fp = recipe_fingerprint(base)
    assert "output" not in fp and "train.log_every" not in fp and not any(k.startswith("provenance") for k in fp)
    assert fp["data.train"].startswith("file ") and fp["model.name"].startswith("folder ")
    moved = tmp_path / "moved.tsv"
    moved.write_bytes(files["train"].read_bytes())
    same = recipe_fingerprint({**base, "output": "b", "train": {**base["train"], "log_every": 1},
                               "data": {"train": str(moved)}})
    assert same == fp  # another output, log cadence and path of the same bytes: the same run
    assert describe_changes(fp, {**fp, "train.lr": 0.002}) == "train.lr 0.001 -> 0.002"


# --------------------------------------------------------------------------------------------
# Defect 2: finished outputs are protected
# --------------------------------------------------------------------------------------------


def test_finished_output_is_refused_without_overwrite(files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(files, out, "--batch-size", "8")) == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "8", "--lr", "3e-3")) == 2
    line = _one_line_error(capsys)
    assert "finished run" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot


def test_overwrite_replaces_the_whole_run(files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(files, out, "--batch-size", "8", "--method", "lora")) == 0
    assert (out / "adapter").is_dir()
    assert main(_args(files, out, "--batch-size", "8", "--overwrite")) == 0
    assert not (out / "adapter").exists()  # nothing of the earlier (LoRA) run is left beside the new one
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["method"]["name"] == "full"


def test_failed_overwrite_leaves_the_finished_run_untouched(files, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_args(files, out, "--batch-size", "8")) == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nno label here\n")
    capsys.readouterr()
    rc = main(["finetune", "--model", str(files["model"]), "--train", str(bad), "--output", str(out),
               "--max-steps", "2", "--overwrite", "--no-progress"])
    assert rc == 2
    assert "bad.tsv" in _one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot


def test_foreign_folder_is_never_written_into(files, tmp_path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my work")
    capsys.readouterr()
    assert main(_args(files, out, "--batch-size", "8", "--overwrite")) == 2
    assert "slimtune did not write" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_output_equal_to_the_model_is_refused(files, tmp_path, capsys) -> None:
    model = tiny.make_tiny_bert(tmp_path / "m")
    (model / "metrics.json").write_text("{}")  # a slimtune output, e.g. an earlier fine-tune
    before = sorted(p.name for p in model.iterdir())
    capsys.readouterr()
    args = _args(files, model, "--overwrite")
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 2
    assert "also an input" in _one_line_error(capsys)
    assert sorted(p.name for p in model.iterdir()) == before


def test_missing_model_is_one_line_exit_2(files, tmp_path, capsys) -> None:
    args = _args(files, tmp_path / "o")
    args[args.index("--model") + 1] = str(tmp_path / "nonexistent")
    capsys.readouterr()
    assert main(args) == 2
    assert "nonexistent" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_pipeline_skips_unchanged_stages_and_reruns_an_interrupted_one(files, tmp_path, capsys) -> None:
    """`slimtune run` owns its stage folders: unchanged stages are skipped; a stage whose result
    exists but whose stage.json still says running (a crash in between) reruns over it."""
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(yaml.safe_dump({
        "output": str(tmp_path / "p"), "model": {"name": str(files["model"])},
        "data": {"train": str(files["train"]), "eval": str(files["eval"])},
        "train": {"max_steps": 2, "batch_size": 8, "tensorboard": False, "progress": False},
        "finetune": {}, "prune": {"sparsity": 0.5}}))
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    assert capsys.readouterr().err.count("unchanged, skipped") == 2
    marker = tmp_path / "p" / "01-finetune" / "stage.json"
    state = json.loads(marker.read_text())
    marker.write_text(json.dumps({**state, "status": "running"}))  # the result is there, "done" is not
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "01-finetune: running" in err and "02-prune: running" in err  # its input changed: reruns too
    assert json.loads(marker.read_text())["status"] == "done"
