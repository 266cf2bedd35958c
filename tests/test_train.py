"""The training loop: schedules, accumulation, determinism, non-finite loss, kill -9 + resume;
autocast precisions, gradient clipping and gradient checkpointing against torch references."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import (
    collate,
    epoch_batches,
    load_classification,
    tokenize_classification,
)
from slimtune.methods import get_method
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.train.loop import NonFiniteLossError, lr_lambda, plan_steps, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir, tiny_assets):
    """(tiny BERT folder, 400 training rows, 100 eval rows)."""
    return tiny_bert_dir, tiny_assets.tsv(400, seed=1), tiny_assets.tsv(100, seed=2)


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


# --------------------------------------------------------------------------------------------
# Precision, clipping, checkpointing: the loop's numbers against plain torch
# --------------------------------------------------------------------------------------------


class _GradSpy:
    """The ``full`` method, keeping a copy of every step's gradients: ``on_step_end`` runs after
    the optimizer step and before ``zero_grad``, so ``.grad`` is what the step used (unscaled,
    clipped)."""

    def __init__(self) -> None:
        self.method = get_method("full")
        self.name, self.config_cls = self.method.name, self.method.config_cls
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, model, cfg, step):
        self.method.on_step_end(model, cfg, step)
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _global_norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()


def _run(tiny, out, steps, dropout=False, before_train=None, **cfg):
    """Train ``steps`` steps (no length grouping); return (model, spy, per-step losses, logits dtypes)."""
    model, data, t = _setup(tiny, max_steps=steps, warmup_ratio=0.0, log_every=1, **cfg)
    if not dropout:
        _no_dropout(model)
    if before_train is not None:
        before_train(model)
    spy, losses, dtypes = _GradSpy(), [], []

    def loss_fn(mdl, batch):
        out = mdl(**batch)
        losses.append(out.loss.item())
        dtypes.append(out.logits.dtype)
        return out.loss

    train(model, spy, spy.config_cls(), data, t, out, total_steps=steps, loss_fn=loss_fn, group_by_length=False)
    return model, spy, losses, dtypes


def _first_batch(tiny, batch_size):
    """The examples of the loop's first step (no grouping, seed 42, epoch 0), collated."""
    _, data, t = _setup(tiny, batch_size=batch_size)
    return collate(data, epoch_batches(data.lengths(), batch_size, t.seed, 0, group_by_length=False)[0])


def test_max_grad_norm_clips_the_global_norm_to_the_cap_like_torch(tiny, tmp_path):
    cap = 0.05
    model, _, _ = _setup(tiny)
    _no_dropout(model)
    ref = copy.deepcopy(model)  # the reference: one plain backward on the same batch, torch's clipping
    ref.train()
    ref(**_first_batch(tiny, 16)).loss.backward()
    params = [p for p in ref.parameters() if p.requires_grad]
    unclipped = torch.nn.utils.clip_grad_norm_(params, cap).item()
    assert unclipped > 4 * cap  # the cap binds: the check below can fail

    _, spy, _, _ = _run(tiny, tmp_path / "clip", 1, max_grad_norm=cap)
    got = spy.grads[0]
    assert _global_norm(got) == pytest.approx(cap, rel=1e-4)
    assert got.keys() == {n for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-7, rtol=1e-4, msg=n)

    _, spy, _, _ = _run(tiny, tmp_path / "noclip", 1, max_grad_norm=0.0)  # 0 disables clipping
    assert _global_norm(spy.grads[0]) == pytest.approx(unclipped, rel=1e-4)


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)], ids=["auto", "bf16", "fp16"])
def test_autocast_precision_matches_fp32_within_its_rounding(tiny, tmp_path, precision, dtype):
    """train.precision autocasts the forward (CPU: ``auto`` is fp32); bf16 and fp16 runs track the
    fp32 run step by step, and are not bit-identical to it (the cast really happens)."""
    steps = 4
    ref_model, ref_spy, ref_losses, ref_dtypes = _run(tiny, tmp_path / "fp32", steps, precision="fp32")
    assert ref_dtypes == [torch.float32] * steps
    model, spy, losses, dtypes = _run(tiny, tmp_path / precision, steps, precision=precision)
    assert dtypes == [dtype] * steps
    assert losses == pytest.approx(ref_losses, abs=2e-3)
    assert all(_global_norm(g) > 0 for g in spy.grads)
    ref_w, w = ref_model.state_dict(), model.state_dict()
    diff = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    if precision == "auto":
        assert diff == 0.0
    else:
        assert 0.0 < diff < 1e-2, diff


def test_fp16_on_cpu_scales_the_loss_and_unscales_before_the_step(tiny, tmp_path):
    """fp16 is not refused on CPU: autocast runs in float16 and a GradScaler (init scale 2**16)
    scales the backward; the optimizer sees gradients equal to fp32's, to fp16 rounding."""
    raw = {}

    def hook(name):
        def record(model):
            p = model.classifier.weight
            p.register_hook(lambda g: raw.setdefault(name, g.detach().clone()))
        return record

    _, ref_spy, _, _ = _run(tiny, tmp_path / "fp32", 1, precision="fp32", max_grad_norm=0.0,
                            before_train=hook("fp32"))
    _, spy, _, dtypes = _run(tiny, tmp_path / "fp16", 1, precision="fp16", max_grad_norm=0.0,
                             before_train=hook("fp16"))
    assert dtypes == [torch.float16]
    ratio = (raw["fp16"].float().norm() / raw["fp32"].norm()).item()
    assert ratio == pytest.approx(2.0 ** 16, rel=1e-2)  # the backward ran on the scaled loss
    got, ref = spy.grads[0], ref_spy.grads[0]
    assert got.keys() == ref.keys()
    for n in ref:  # ...and the step used unscaled gradients
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=2e-2, msg=n)


def test_gradient_checkpointing_recomputes_and_keeps_losses_and_gradients(tiny, tmp_path):
    """Same seed, dropout on: with checkpointing each encoder layer's inside runs twice a step
    (forward, then again in backward) and every loss, gradient and final weight equals the plain
    run's. (Transformers checkpoints the layer's ``forward``: hooks on the layer itself fire once;
    its submodules' fire on the recomputation too.)"""
    steps = 3
    runs = {}
    for ckpt in (False, True):
        calls = []

        def prepare(model, ckpt=ckpt, calls=calls):
            if ckpt:
                model.gradient_checkpointing_enable()
            model.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(1))

        model, spy, losses, _ = _run(tiny, tmp_path / str(ckpt), steps, dropout=True, before_train=prepare)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == ckpt
        runs[ckpt] = (len(calls), losses, spy.grads, model.state_dict())
    (n0, l0, g0, w0), (n1, l1, g1, w1) = runs[False], runs[True]
    assert (n0, n1) == (steps, 2 * steps)
    assert l1 == pytest.approx(l0, abs=1e-6)
    for a, b in zip(g0, g1, strict=True):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-5, msg=n)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_finetune_model_gradient_checkpointing_flag_turns_it_on(tiny, tmp_path, monkeypatch):
    """``model.gradient_checkpointing=true`` through ``slimtune finetune``: each encoder layer's
    feed-forward runs twice per step and the exported weights equal those of the run without it."""
    from torch.nn.modules.module import register_module_forward_hook
    from transformers.models.bert.modeling_bert import BertIntermediate

    from slimtune.cli.main import main

    monkeypatch.setenv("SLIMTUNE_NO_PROGRESS", "1")
    model_dir, train_f, _ = tiny
    calls = {"n": 0}

    def count(module, args, output):
        if isinstance(module, BertIntermediate):
            calls["n"] += 1

    handle = register_module_forward_hook(count)
    threads = torch.get_num_threads()
    n = {}
    try:
        for flag in ("false", "true"):
            calls["n"] = 0
            assert main(["finetune", "--model", str(model_dir), "--train", str(train_f), "--output",
                         str(tmp_path / flag), "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3",
                         f"model.gradient_checkpointing={flag}", "train.tensorboard=false"]) == 0
            n[flag] = calls["n"]
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    assert n == {"false": 3 * 2, "true": 2 * 3 * 2}  # 3 steps x 2 layers, twice with recomputation
    a, b = (load_file(str(tmp_path / f / "model.safetensors")) for f in ("false", "true"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
