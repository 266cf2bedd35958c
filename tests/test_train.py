"""The training loop: schedules, accumulation, determinism, non-finite loss, kill -9 + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, sentiment_rows, write_tsv

from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.methods import get_method
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train.loop import NonFiniteLossError, lr_lambda, plan_steps, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_bert(root / "bert")
    train_f = write_tsv(root / "train.tsv", sentiment_rows(400, seed=1))
    eval_f = write_tsv(root / "eval.tsv", sentiment_rows(100, seed=2))
    return model, train_f, eval_f


def _setup(tiny, **cfg):
    model_dir, train_f, _ = tiny
    tok = load_tokenizer(str(model_dir))
    raw = load_classification(train_f)
    data = tokenize_classification(raw, tok, 32)
    torch.manual_seed(0)
    model = load_model(str(model_dir), "classification", label_names=raw.label_names)
    t = TrainConfig(**{"batch_size": 16, "lr": 1e-3, "tensorboard": False, "progress": False, **cfg})
    return model, data, t


def test_schedule_shapes():
    t = TrainConfig(warmup_ratio=0.1, scheduler="linear")
    f = lr_lambda(t, 100)
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0) and f(99) < 0.02
    c = lr_lambda(TrainConfig(warmup_ratio=0.0, scheduler="cosine"), 100)
    assert c(50) == pytest.approx(0.5, abs=0.02) and c(0) == 1.0
    assert plan_steps(100, TrainConfig(batch_size=10, epochs=2, grad_accum=2)) == 10
    assert plan_steps(100, TrainConfig(max_steps=7)) == 7


def test_loss_decreases_and_best_kept(tiny, tmp_path):
    model, data, t = _setup(tiny, epochs=3)
    m = get_method("full")
    losses = []

    def eval_fn(mdl):
        mdl.eval()
        with torch.no_grad():
            from slimtune.data.datasets import collate
            b = collate(data, list(range(64)))
            loss = mdl(**b).loss.item()
        losses.append(loss)
        return {"loss": loss}

    out = train(model, m, m.config_cls(), data, t, tmp_path, total_steps=plan_steps(len(data), t),
                eval_fn=eval_fn, metric="loss")
    assert losses[-1] < losses[0]
    assert out["best_loss"] == pytest.approx(min(losses))
    assert (tmp_path / "metrics.jsonl").is_file()
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in e for e in events) and any("train/loss" in e for e in events)


def _no_dropout(model):
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def test_grad_accumulation_matches_big_batch(tiny, tmp_path):
    # Without length grouping the shuffled order does not depend on batch size, so 4
    # accumulated micro-batches of 8 hold exactly the examples of one batch of 32.
    weights = []
    for bs, acc in ((32, 1), (8, 4)):
        model, data, t = _setup(tiny, batch_size=bs, grad_accum=acc, max_steps=4, warmup_ratio=0.0)
        _no_dropout(model)
        m = get_method("full")
        train(model, m, m.config_cls(), data, t, tmp_path / f"bs{bs}", total_steps=4, group_by_length=False)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    a, b = weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    # ...and a different grouping really gives different weights (the check can fail).
    model, data, t = _setup(tiny, batch_size=8, grad_accum=1, max_steps=4, warmup_ratio=0.0)
    _no_dropout(model)
    train(model, m, m.config_cls(), data, t, tmp_path / "bs8-no-accum", total_steps=4, group_by_length=False)
    assert any((model.state_dict()[k] - a[k]).abs().max() > 1e-4 for k in a)


def test_non_finite_loss_stops_with_clear_message(tiny, tmp_path):
    model, data, t = _setup(tiny, max_steps=20, save_every=5)
    m = get_method("full")
    calls = {"n": 0}

    def loss_fn(mdl, batch):
        calls["n"] += 1
        loss = mdl(**batch).loss
        return loss * float("nan") if calls["n"] > 7 else loss

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 8.*Last good checkpoint: .*step-0000005"):
        train(model, m, m.config_cls(), data, t, tmp_path, total_steps=20, loss_fn=loss_fn)
    assert (tmp_path / "checkpoints" / "step-0000005" / "trainable.safetensors").is_file()


def _finetune_cmd(model_dir, train_f, eval_f, out, steps):
    return [sys.executable, "-m", "slimtune.cli.main", "finetune", "--model", str(model_dir), "--train", str(train_f),
            "--eval", str(eval_f), "--output", str(out), "--max-steps", str(steps), "--batch-size", "4",
            "--lr", "5e-4", "train.save_every=20", "train.eval_every=400", "train.tensorboard=false",
            "train.num_threads=1"]


def test_kill_9_and_resume_gives_identical_result(tiny, tmp_path):
    """A real process is SIGKILLed mid-run; the same command, restarted, ends bit-identical to an
    unbroken run. Python start-up (torch + transformers imports, ~10 s of CPU) is most of the
    cost here, so the unbroken reference runs in this process, beside the resumed process."""
    from slimtune.cli.main import main

    model_dir, train_f, eval_f = tiny
    steps = 800  # ~5 ms a step: the slack after the kill point covers the 50 ms polling many times over
    out = tmp_path / "killed"
    proc = subprocess.Popen(_finetune_cmd(model_dir, train_f, eval_f, out, steps), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = out / "checkpoints"
    while time.time() < deadline:  # wait until a mid-run checkpoint exists, then SIGKILL
        done = [p for p in ckpts.glob("step-*") if (p / "state.json").is_file()] if ckpts.is_dir() else []
        if any(int(p.name.split("-")[1]) >= 200 for p in done):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()

    resumed = subprocess.Popen(_finetune_cmd(model_dir, train_f, eval_f, out, steps), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref = tmp_path / "ref"  # unbroken run, same arguments (train.num_threads=1 as in the subprocesses)
    threads = torch.get_num_threads()
    try:
        assert main(_finetune_cmd(model_dir, train_f, eval_f, ref, steps)[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_res = json.loads((out / "metrics.json").read_text())
    assert 200 <= m_res["train"]["resumed_from_step"] < steps
    for k in ("accuracy", "macro_f1", "loss"):
        assert m_res[k] == m_ref[k], k
    w_ref, w_res = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in w_ref:
        torch.testing.assert_close(w_res[k], w_ref[k], atol=0, rtol=0)
    # The training log was truncated at the checkpoint and continued: one entry per logged step.
    steps_logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
                    if "train/loss" in x]
    assert steps_logged == sorted(set(steps_logged))
