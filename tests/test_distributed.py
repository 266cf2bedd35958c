"""Data-parallel training on 2 CPU processes (gloo) equals one process, to 1e-5.

Two launches: the CLI (``slimtune finetune --nproc 2``) end to end, and one torchrun job that
runs the library scenarios of ``helpers_distributed.py`` (LoRA under DDP, FSDP with full
export, resume with another process count in both directions, distillation with a live
teacher). Every reference is the same code run here in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_distributed import HALF, STEPS, make_assets, run
from safetensors.torch import load_file

from slimtune.train.distributed import local_slice, strip_nproc

TESTS = Path(__file__).parent
# OMP_NUM_THREADS=1: 2 ranks x 1 thread on 2 cores (what torchrun would choose anyway).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
TOL = {"atol": 1e-5, "rtol": 0.0}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_local_slices_partition_every_global_batch():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = [local_slice(list(range(100, 100 + n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(100, 100 + n))  # contiguous, in order, disjoint
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert strip_nproc(["finetune", "--nproc", "2", "--lr", "1", "--nproc=3", "a=b"]) == ["finetune", "--lr", "1", "a=b"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_assets(root)
    return root


@pytest.fixture(scope="module")
def worker(assets):
    """One torchrun job of 2 ranks runs every library scenario (startup is paid once)."""
    run(assets, "single_phase1", assets / "single_phase1")  # checkpoint that 2 ranks resume
    shutil.copytree(assets / "single_phase1", assets / "ddp_phase2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(TESTS / "helpers_distributed.py"), str(assets)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return assets


def test_cli_two_processes_equal_one(assets, tmp_path):
    """Same global batch and seed: final weights equal, one log, one export (rank 0)."""
    from slimtune.cli.main import main

    args = ["finetune", "--model", str(assets / "bert"), "--train", str(assets / "train.tsv"),
            "--eval", str(assets / "eval.tsv"), "--max-steps", str(STEPS), "--batch-size", "7",
            "--grad-accum", "2", "--lr", "1e-3", "train.metric=loss", "train.eval_every=4",
            "train.tensorboard=false", "train.log_every=1"]
    two = subprocess.run([sys.executable, "-m", "slimtune.cli.main", *args, "--output", str(tmp_path / "two"), "--nproc", "2"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    one_w = load_file(str(tmp_path / "one" / "model.safetensors"))
    two_w = load_file(str(tmp_path / "two" / "model.safetensors"))
    init = load_file(str(assets / "bert" / "model.safetensors"))
    assert _max_diff(one_w, two_w) <= 1e-5
    assert _max_diff(one_w, {k: init[k] for k in one_w}) > 1e-3  # it trained: the check can fail
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["train"]["world_size"] == 2 and m2["train"]["parallel"] == "ddp"
    assert m2["train"]["samples"] == m1["train"]["samples"]  # global samples, not per rank
    assert m2["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    # rank 0 alone logs: the same events as one process (eval + train), each once
    ev1, ev2 = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [sorted(e) for e in ev2] == [sorted(e) for e in ev1]
    for a, b in zip(ev1, ev2, strict=True):
        for k in ("train/loss", "eval/loss"):
            if k in a:
                assert b[k] == pytest.approx(a[k], abs=1e-5)
    assert two.stdout.count("| run |") == 1  # one report
    assert not (tmp_path / "two" / "checkpoints").exists()


def test_lora_under_ddp_syncs_only_the_adapter(worker, tmp_path):
    ref = run(worker, "lora", tmp_path / "lora")
    got = json.loads((worker / "lora" / "summary.json").read_text())
    a = load_file(str(tmp_path / "lora" / "weights.safetensors"))
    b = load_file(str(worker / "lora" / "weights.safetensors"))
    assert _max_diff(a, b) <= 1e-5
    assert any("lora_A" in k for k in b) and not any("query.base_layer" in k for k in b)
    adapter_bytes = 4 * sum(t.numel() for t in b.values())  # fp32 LoRA matrices + trained head
    assert got["grad_sync_mb"] * 1e6 == pytest.approx(adapter_bytes)  # what DDP all-reduces
    assert ref["steps"] == got["steps"] == STEPS
    # LoRA under FSDP (frozen and trainable weights in the same shards) trains the same adapter
    assert _max_diff(a, load_file(str(worker / "lora_fsdp" / "weights.safetensors"))) <= 1e-5


def test_fsdp_equals_one_process_and_exports_full_weights(worker, tmp_path):
    run(worker, "full", tmp_path / "full")
    ref = load_file(str(tmp_path / "full" / "weights.safetensors"))
    got = load_file(str(worker / "fsdp" / "weights.safetensors"))
    assert _max_diff(ref, got) <= 1e-5
    exported = load_file(str(worker / "fsdp" / "export" / "model.safetensors"))  # plain HF folder
    for k, v in ref.items():
        torch.testing.assert_close(exported[k], v, **TOL)
    assert json.loads((worker / "fsdp" / "summary.json").read_text())["parallel"] == "fsdp"


def test_resume_with_a_different_number_of_processes(worker, tmp_path):
    """2 ranks (FSDP) -> 1 process, and 1 process -> 2 ranks (DDP), both equal an unbroken run."""
    run(worker, "full_phase2", tmp_path / "unbroken")  # constant LR, STEPS steps in one go
    ref = load_file(str(tmp_path / "unbroken" / "weights.safetensors"))
    # The checkpoint written by 2 FSDP ranks is unsharded: one process resumes it.
    ckpt = worker / "fsdp_phase1" / "checkpoints" / f"step-{HALF:07d}"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    shutil.copytree(worker / "fsdp_phase1", tmp_path / "resumed")
    out = run(worker, "full_phase2", tmp_path / "resumed")
    assert out["resumed_from_step"] == HALF and out["steps"] == STEPS
    assert _max_diff(ref, load_file(str(tmp_path / "resumed" / "weights.safetensors"))) <= 1e-5
    # ...and 2 DDP ranks resumed the single-process checkpoint (in the worker job).
    summary = json.loads((worker / "ddp_phase2" / "summary.json").read_text())
    assert summary["resumed_from_step"] == HALF and summary["world_size"] == 2
    assert _max_diff(ref, load_file(str(worker / "ddp_phase2" / "weights.safetensors"))) <= 1e-5
    # the resume really continued from step HALF: the half-way weights are far from the end
    half = load_file(str(worker / "single_phase1" / "weights.safetensors"))
    assert _max_diff(ref, half) > 1e-3


def test_distillation_with_replicated_teacher(worker, tmp_path):
    run(worker, "distill", tmp_path / "distill")
    a = load_file(str(tmp_path / "distill" / "weights.safetensors"))
    b = load_file(str(worker / "distill" / "weights.safetensors"))
    assert len(a) > 0 and _max_diff(a, b) <= 1e-5


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in map(int, (task / "children").read_text().split()):
            out += [child, *_descendants(child)]
    return out


@pytest.mark.slow
def test_kill_9_of_a_distributed_job_then_resume_is_bit_identical(assets, tmp_path, tiny_bert_dir):
    """SIGKILL the whole 2-rank job mid-run (launcher and ranks); the same command resumes from
    the last checkpoint and ends with exactly the weights of an unbroken 2-rank run. Dropout is
    on: each rank's RNG stream comes back from the checkpoint too."""
    model = tiny_bert_dir  # dropout on
    args = [sys.executable, "-m", "slimtune.cli.main", "finetune", "--nproc", "2", "--model", str(model),
            "--train", str(assets / "train.tsv"), "--max-steps", "300", "--batch-size", "7", "--lr", "5e-4",
            "train.save_every=20", "train.tensorboard=false"]
    ref = subprocess.run([*args, "--output", str(tmp_path / "ref")], env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    job = subprocess.Popen([*args, "--output", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a mid-run checkpoint, then SIGKILL every process
        done = [p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file()]
        if any(int(p.name.split("-")[1]) >= 60 for p in done):
            break
        time.sleep(0.05)
    assert job.poll() is None, "run finished before it could be killed; make it longer"
    for pid in [job.pid, *_descendants(job.pid)]:  # torchrun starts ranks in their own sessions
        os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (out / "metrics.json").exists()
    resumed = subprocess.run([*args, "--output", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())["train"]
    assert 60 <= summary["resumed_from_step"] < 300
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
