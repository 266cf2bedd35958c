"""The one training loop, used by every method (fine-tuning, adapters, distillation, pruning).

A method changes *what* trains (its ``apply``) and may act after each step (``on_step_end``);
distillation changes the loss (``loss_fn``). The loop itself never looks at a method's name.

Resumability: a checkpoint holds the trainable weights, optimizer and scheduler state, the
RNG state and the position in the epoch (batches are a pure function of seed and epoch). It is
written to a temp folder and renamed, so SIGKILL at any moment leaves the previous checkpoint
intact; the same command restarted continues bit-for-bit where it stopped. Everything in it is
safetensors or JSON (no pickle is ever loaded), and ``fingerprint.json`` records the run that
wrote it (:mod:`slimtune.train.fingerprint`): a resume whose recipe, data or model differ, or
whose saved position does not fit the data, stops with one line instead of continuing another run.

Data parallelism (torchrun, ``--nproc N``): the loop runs on every rank through a
:class:`slimtune.train.distributed.Parallel` (DDP, or FSDP2 with ``train.fsdp``). ``batch_size`` stays
the global micro-batch; each rank computes its slice and the gradient is the mean over the whole
global batch, so N processes train the same model as one. Rank 0 alone logs, writes metrics and
checkpoints (which hold unsharded, global state: resumable with any number of processes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slimtune.config.defaults import FALLBACK
from slimtune.config.recipe import TrainConfig
from slimtune.data.datasets import DataError, TokenizedData, collate, epoch_batches, num_batches
from slimtune.io import atomic_dir, atomic_write_text
from slimtune.methods import load_trainable_state, trainable_state
from slimtune.train.distributed import Parallel, all_reduce_sum, barrier, broadcast_object
from slimtune.train.fingerprint import ResumeError, check_same_run, write_fingerprint
from slimtune.train.state_file import load_state, save_state


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept on disk."""


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvalFn = Callable[[torch.nn.Module], dict[str, Any]]


def default_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (cross-entropy for classifiers, shifted next-token CE for LMs)."""
    return model(**batch).loss


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps the run will take (needed before training by LR schedules and AdaLoRA).

    ``max_steps`` if set, else ``epochs`` passes, but at least ``min_steps`` (the floor that keeps
    a small file from being under-trained; the loop then runs more epochs). Unset (None) epochs
    and floor, on a TrainConfig built without a recipe, are :data:`~slimtune.config.defaults.FALLBACK`'s.
    """
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(num_batches(n_examples, cfg.batch_size) / cfg.grad_accum)
    epochs = FALLBACK["train.epochs"] if cfg.epochs is None else cfg.epochs
    return max(1, math.ceil(epochs * per_epoch), cfg.min_steps or 0)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at step s: linear warm-up, then linear/cosine decay or flat."""
    warmup = int(cfg.warmup_ratio * total)

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # The fused kernel (CPU and CUDA) updates all tensors in one pass: >10x less optimizer time
    # than the per-tensor loop on MiniLM here. It needs floating params on one device type.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) and \
        len({p.device.type for p in params}) == 1
    lr = FALLBACK["train.lr"] if cfg.lr is None else cfg.lr  # None: a TrainConfig built without a recipe
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as it runs on ``device``: ``auto`` is bf16 on GPUs that support it, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16; ``auto`` means bf16 on GPUs that support it, else fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class LoopState:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch: int = 0  # next micro-batch index within the epoch
    samples: int = 0  # training examples consumed
    tokens: int = 0  # their tokens (padding not counted)
    train_seconds: float = 0.0  # wall time in forward/backward/step (no eval)
    best: float | None = None  # best value of the selection metric
    best_step: int = -1
    bad_evals: int = 0  # evaluations since the last improvement


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: Any, state: LoopState, extra: dict[str, Any] | None = None,
                    dp: Parallel | None = None, fingerprint: dict[str, Any] | None = None) -> None:
    """Write a resumable checkpoint atomically (temp folder + rename).

    Files: ``trainable.safetensors``, ``optimizer.safetensors`` (optimizer, scheduler and torch
    RNG state; :mod:`slimtune.train.state_file`, no pickle), ``state.json`` (position, Python
    RNG) and, given ``fingerprint``, ``fingerprint.json`` (the run that wrote it).

    With ``dp`` distributed, every rank must call it: weights and optimizer state are gathered
    unsharded (the single-process format), every rank's RNG is kept in ``rng_ranks.safetensors``,
    rank 0 writes, and all ranks wait until the checkpoint is complete.
    """
    if dp is not None and dp.distributed:
        _save_checkpoint_distributed(path, opt, sched, state, extra, dp, fingerprint)
        return
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        rng = _rng_state()
        save_state(tmp / "optimizer.safetensors", {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                   "torch_rng": rng["torch"], "cuda_rng": rng.get("cuda")})
        meta = {"state": asdict(state), "python_rng": _pyrng_to_json(rng["python"]), **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        if fingerprint is not None:
            write_fingerprint(tmp, fingerprint)


def _save_checkpoint_distributed(path: Path, opt: torch.optim.Optimizer, sched: Any, state: LoopState,
                                 extra: dict[str, Any] | None, dp: Parallel,
                                 fingerprint: dict[str, Any] | None) -> None:
    weights = dp.trainable_state()  # collectives first, on every rank, in the same order
    optim = dp.optimizer_state(opt)
    rngs = dp.rng_states()
    if dp.is_main:
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            save_state(tmp / "optimizer.safetensors", {"optimizer": optim, "scheduler": sched.state_dict(),
                                                       "torch_rng": rngs[0]["torch"], "cuda_rng": None})
            save_state(tmp / "rng_ranks.safetensors", rngs)
            meta = {"state": asdict(state), "python_rng": _pyrng_to_json(random.getstate()),
                    "world_size": dp.world, "parallel": dp.kind, **(extra or {})}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))
            if fingerprint is not None:
                write_fingerprint(tmp, fingerprint)
    barrier()  # nobody reads or prunes a checkpoint before it is complete


def _pyrng_to_json(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    dp: Parallel | None = None, seed: int = 0) -> LoopState:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the loop state.

    With ``dp`` distributed every rank reads the (unsharded) checkpoint, whatever number of
    processes wrote it; each rank gets its own RNG back when the world size is unchanged.
    """
    if dp is not None and dp.distributed:
        dp.load_trainable_state(load_file(str(path / "trainable.safetensors")))
        blob = load_state(path / "optimizer.safetensors")
        dp.load_optimizer_state(opt, blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        meta = json.loads((path / "state.json").read_text())
        st = LoopState(**meta["state"])
        ranks = path / "rng_ranks.safetensors"
        torch.set_rng_state(blob["torch_rng"])
        dp.set_rng(load_state(ranks) if ranks.is_file() else None, seed, st.step)
        v, s, g = meta["python_rng"]
        random.setstate((v, tuple(s), g))
        return st
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    # safetensors + JSON structure (slimtune.train.state_file): no pickle is loaded
    blob = load_state(path / "optimizer.safetensors")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    meta = json.loads((path / "state.json").read_text())
    v, s, g = meta["python_rng"]
    random.setstate((v, tuple(s), g))
    return LoopState(**meta["state"])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint (temp folders are ignored)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    done = sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per event) plus optional TensorBoard scalars."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        if self.path.is_file():  # drop events past the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional (the logging extra)

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                pass

    def write(self, step: int, values: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Loop:
    """What the steps of one :func:`train` call share (torchtune style: set up once, then steps)."""

    dp: Parallel
    net: torch.nn.Module  # what the loss calls (the DDP/FSDP wrapper)
    model: torch.nn.Module  # what trains
    cfg: TrainConfig
    data: TokenizedData
    method: Any
    method_cfg: Any
    loss_fn: LossFn
    eval_fn: EvalFn | None
    metric: str
    total_steps: int
    ckpt_dir: Path
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    state: LoopState
    resumed: Path | None
    fingerprint: dict[str, Any] | None = None  # the run's identity, saved in (and checked against) checkpoints
    log: Any = None
    progress: Any = None
    grad_norm: Any = None  # the last step's global gradient norm before clipping (clipping on)

    @property
    def sign(self) -> float:
        """-1 when the metric is minimised ('loss'): the loop maximises ``sign * metric``."""
        return -1.0 if self.metric == "loss" else 1.0


def train(model: torch.nn.Module, method: Any, method_cfg: Any, data: TokenizedData,
          cfg: TrainConfig, out_dir: Path, *, total_steps: int, eval_fn: EvalFn | None = None,
          metric: str = "accuracy", loss_fn: LossFn = default_loss,
          group_by_length: bool = True, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` in place; return a summary (steps, best metric, timing, memory).

    Under torchrun every rank calls this with the same arguments (see :mod:`slimtune.train.distributed`);
    afterwards ``model`` holds the trained weights on every rank (DDP) or on rank 0 only (FSDP:
    gathered from the shards, on the CPU; other ranks keep meta placeholders).

    Args:
        model: the model with the method already applied (only its trainable params update).
        method: the registered method; ``on_step_end`` is called after each optimizer step.
        method_cfg: the method's config (passed back to its hooks).
        data: tokenized training data.
        cfg: loop settings.
        out_dir: run folder; checkpoints go to ``out_dir/checkpoints``.
        total_steps: optimizer steps to run (see :func:`plan_steps`).
        eval_fn: returns a metrics dict for the current model; None disables evaluation.
        metric: key of ``eval_fn``'s result that picks the best checkpoint ('loss' is minimised).
        loss_fn: computes the scalar loss of a batch (distillation passes its own).
        group_by_length: batch examples of similar length together (see data.epoch_batches).
        fingerprint: what identifies the run (:func:`slimtune.train.fingerprint.recipe_fingerprint`);
            the loop adds its own derived values. Saved in every checkpoint; a checkpoint whose
            fingerprint differs is never resumed (:class:`~slimtune.train.fingerprint.ResumeError`).
    """
    if len(data) == 0:
        raise DataError("the training data holds no examples: nothing to train on")
    fp = {**(fingerprint or {}), **_loop_fingerprint(data, cfg, method, group_by_length)}
    loop = _setup_loop(model, method, method_cfg, data, cfg, Path(out_dir), total_steps=total_steps,
                       eval_fn=eval_fn, metric=metric, loss_fn=loss_fn, fingerprint=fp)
    lengths = data.lengths()
    # raw-LM blocks are equal-length; chat SFT examples are not
    grouped = group_by_length and (not data.causal or data.token_labels is not None)
    loop.model.train()
    stop = False
    while loop.state.step < total_steps and not stop:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, loop.state.epoch, group_by_length=grouped)
        before = (loop.state.step, loop.state.epoch)
        stop = _run_epoch(loop, batches)
        if (loop.state.step, loop.state.epoch) == before:  # never spin: every pass must move on
            raise ResumeError(f"no step possible at epoch {loop.state.epoch}, batch {loop.state.batch} of "
                              f"{len(batches)}; start fresh with --no-resume")
    return _finish(loop, stop)


def _loop_fingerprint(data: TokenizedData, cfg: TrainConfig, method: Any, group_by_length: bool) -> dict[str, Any]:
    """What the loop derives and a checkpoint's position depends on (``loop.*`` keys).

    Not the number of steps (a run with a constant LR may be extended) nor DDP vs FSDP or the
    number of processes (their checkpoints are interchangeable); a recipe's fingerprint holds
    ``train.max_steps`` / ``train.epochs``, which shape its LR schedule.
    """
    keys = ("batch_size", "grad_accum", "seed", "lr", "weight_decay", "warmup_ratio", "scheduler",
            "max_grad_norm", "precision")
    return {"loop.examples": len(data), "loop.batches_per_epoch": num_batches(len(data), cfg.batch_size),
            "loop.method": getattr(method, "name", type(method).__name__),
            "loop.group_by_length": group_by_length, **{f"loop.{k}": getattr(cfg, k) for k in keys}}


def _setup_loop(model: torch.nn.Module, method: Any, method_cfg: Any, data: TokenizedData, cfg: TrainConfig,
                out_dir: Path, *, total_steps: int, eval_fn: EvalFn | None, metric: str, loss_fn: LossFn,
                fingerprint: dict[str, Any] | None = None) -> _Loop:
    """Wrap the model for data parallelism, build optimizer/scheduler/scaler, resume, open the log."""
    dp = Parallel(model, fsdp=cfg.fsdp, find_unused_parameters=cfg.ddp_find_unused_parameters)
    if dp.kind == "fsdp" and cfg.precision == "fp16":
        raise ValueError("train.precision=fp16 is not supported with train.fsdp (sharded gradients need a "
                         "sharded loss scaler); use bf16")
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    opt = make_optimizer(dp.module, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(dp.device.type, enabled=cfg.precision == "fp16")
    loop = _Loop(dp=dp, net=dp.net, model=dp.module, cfg=cfg, data=data, method=method, method_cfg=method_cfg,
                 loss_fn=loss_fn, eval_fn=eval_fn, metric=metric, total_steps=total_steps, ckpt_dir=ckpt_dir,
                 opt=opt, sched=sched, scaler=scaler, state=LoopState(), resumed=None, fingerprint=fingerprint)
    _setup_resume(loop)
    loop.log = MetricsLog(out_dir, loop.state.step, cfg.tensorboard) if dp.is_main else _NullLog()
    loop.progress = _progress(cfg, total_steps, loop.state.step, dp.is_main)
    return loop


def _setup_resume(loop: _Loop) -> None:
    """Continue from the newest checkpoint (``train.resume``); rank 0's view of the folder decides.

    The checkpoint must have been written by this run (its ``fingerprint.json`` equal to this
    run's) and its position must fit the data; otherwise ResumeError, before anything changes.
    Without ``train.resume`` the folder's old checkpoints are removed: a fresh run never mixes
    its checkpoints with another run's.
    """
    cfg, dp = loop.cfg, loop.dp
    resumed = latest_checkpoint(loop.ckpt_dir) if cfg.resume else None
    if dp.distributed:  # first: every rank then checks the same checkpoint (and raises alike)
        resumed = broadcast_object(resumed)
        dp.seed_ranks(cfg.seed)
    if resumed is not None:
        if loop.fingerprint is not None:
            check_same_run(resumed, loop.fingerprint)
        _check_position(resumed, num_batches(len(loop.data), cfg.batch_size), loop.total_steps)
    elif not cfg.resume and dp.is_main and loop.ckpt_dir.is_dir():
        shutil.rmtree(loop.ckpt_dir)
    if resumed is not None:
        loop.state = load_checkpoint(resumed, loop.model, loop.opt, loop.sched, dp=dp, seed=cfg.seed)
        if dp.is_main:
            print(f"[slimtune] resuming from {resumed} (step {loop.state.step}/{loop.total_steps})", file=sys.stderr)
    loop.resumed = resumed


def _check_position(ckpt: Path, n_batches: int, total_steps: int) -> None:
    """A saved position (``state.json``) must index this data: batch in [0, batches per epoch), step <= total."""
    try:
        st = LoopState(**json.loads((ckpt / "state.json").read_text())["state"])
    except (ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{ckpt / 'state.json'}: unreadable ({e}); start fresh with --no-resume") from None
    if not (0 <= st.batch < n_batches and 0 <= st.step <= total_steps and st.epoch >= 0):
        raise ResumeError(f"{ckpt}: saved position (step {st.step}, epoch {st.epoch}, batch {st.batch}) does not "
                          f"fit this run ({n_batches} batches per epoch, {total_steps} steps); start fresh with "
                          f"--no-resume (train.resume=false) or use a new --output")


def _run_epoch(loop: _Loop, batches: list[list[int]]) -> bool:
    """Optimizer steps over the rest of one epoch's batches; True when early stopping says stop."""
    cfg, st = loop.cfg, loop.state
    while st.batch < len(batches) and st.step < loop.total_steps:
        t0 = time.perf_counter()
        group = batches[st.batch: st.batch + cfg.grad_accum]
        n_group = sum(len(i) for i in group)
        loss_sum = _step(loop, group, n_group)
        st.step += 1
        st.batch += len(group)
        st.samples += n_group
        st.tokens += sum(len(loop.data.input_ids[i]) for idx in group for i in idx)
        st.train_seconds += time.perf_counter() - t0
        epoch_end = st.batch >= len(batches)
        if epoch_end:
            st.epoch, st.batch = st.epoch + 1, 0
        loop.progress.update(1)
        if st.step % cfg.log_every == 0 or st.step == loop.total_steps:
            _log_train(loop, loss_sum, n_group, len(batches))
        last = st.step == loop.total_steps
        do_eval = loop.eval_fn is not None and (
            last or (st.step % cfg.eval_every == 0 if cfg.eval_every > 0 else epoch_end))
        stop = _evaluate(loop) if do_eval else False
        if do_eval or (cfg.save_every > 0 and st.step % cfg.save_every == 0) or last or stop:
            save_checkpoint(loop.ckpt_dir / f"step-{st.step:07d}", loop.model, loop.opt, loop.sched, st, dp=loop.dp,
                            fingerprint=loop.fingerprint)
            if loop.dp.is_main:
                _prune_checkpoints(loop.ckpt_dir, cfg.keep_checkpoints)
        if stop or epoch_end:
            return stop
    return False


def _step(loop: _Loop, group: list[list[int]], n_group: int) -> float:
    """One optimizer step over the micro-batches of ``group``; returns this rank's summed loss."""
    cfg, dp, st = loop.cfg, loop.dp, loop.state
    loss_sum = 0.0
    for j, idx in enumerate(group):
        mine = dp.local(idx)  # this rank's slice of the global micro-batch (all of it alone)
        with dp.sync(last=j == len(group) - 1):
            # An empty slice still runs a forward/backward, at weight 0, so that every
            # rank joins the gradient all-reduce.
            batch = {k: v.to(dp.device, non_blocking=True) for k, v in collate(loop.data, mine or idx[:1]).items()}
            with autocast_ctx(cfg.precision, dp.device):
                loss = loop.loss_fn(loop.net, batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {st.step + 1} (epoch {st.epoch}); "
                    f"stopped. Last good checkpoint: {latest_checkpoint(loop.ckpt_dir) or 'none yet'}. "
                    f"Try a lower train.lr or train.precision=fp32.")
            # Weight each micro-batch by its size: the step's gradient is the mean over
            # all examples of the group, whatever the split. DDP averages over ranks,
            # hence the factor world (1 alone): uneven slices stay exact.
            loop.scaler.scale(loss * (len(mine) * dp.world / n_group)).backward()
        loss_sum += loss.item() * len(mine)
    if cfg.max_grad_norm > 0:
        loop.scaler.unscale_(loop.opt)
        loop.grad_norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.max_grad_norm)
    loop.scaler.step(loop.opt)
    loop.scaler.update()
    loop.method.on_step_end(loop.model, loop.method_cfg, st.step + 1)
    loop.sched.step()
    loop.opt.zero_grad(set_to_none=True)
    return loss_sum


def _log_train(loop: _Loop, loss_sum: float, n_group: int, n_batches: int) -> None:
    """One ``train/*`` event: loss, learning rate, epoch, throughput (and the gradient norm)."""
    st = loop.state
    if loop.dp.distributed:
        loss_sum = all_reduce_sum([loss_sum])[0]
    values = {"train/loss": loss_sum / n_group, "train/lr": loop.sched.get_last_lr()[0],
              "train/epoch": st.epoch + st.batch / n_batches,
              "train/samples_per_s": st.samples / max(st.train_seconds, 1e-9),
              "train/seconds": st.train_seconds, "train/tokens": st.tokens}  # cumulative: per-step rates from deltas
    if loop.grad_norm is not None:  # every rank converts (a sharded norm may need a collective)
        norm = loop.grad_norm
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):  # fp16 overflow steps (skipped by the scaler) have none
            values["train/grad_norm"] = norm
    loop.log.write(st.step, values)
    loop.progress.set_postfix(loss=f"{loss_sum / n_group:.4f}")


def _evaluate(loop: _Loop) -> bool:
    """Evaluate, keep the best weights, count evaluations without improvement; True: stop early."""
    dp, st, metric = loop.dp, loop.state, loop.metric
    # Every rank evaluates (FSDP needs all of them for each forward; no rank idles
    # into a collective timeout); rank 0's numbers decide for all.
    result = loop.eval_fn(loop.net if dp.kind == "fsdp" else loop.model)  # type: ignore[misc]
    loop.model.train()
    if dp.distributed:
        result = broadcast_object(result)
    bad = {k: v for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:  # never logged (a bare NaN is not JSON) nor compared: stop like a non-finite training loss
        k, v = next(iter(bad.items()))
        raise NonFiniteLossError(f"evaluation {k} is {v} at step {st.step}; stopped. Last good checkpoint: "
                                 f"{latest_checkpoint(loop.ckpt_dir) or 'none yet'}. Try a lower train.lr or "
                                 f"train.precision=fp32.")
    loop.log.write(st.step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    value = loop.sign * float(result[metric])
    if st.best is None or value > st.best:
        st.best, st.best_step, st.bad_evals = value, st.step, 0
        weights = dp.trainable_state() if dp.distributed else trainable_state(loop.model)
        if dp.is_main:
            with atomic_dir(loop.ckpt_dir / "best") as tmp:
                save_file(weights, str(tmp / "trainable.safetensors"))
                (tmp / "state.json").write_text(json.dumps({"step": st.step, metric: result[metric]}))
        return False
    st.bad_evals += 1
    patience = loop.cfg.early_stopping_patience
    if patience and st.bad_evals >= patience:
        if dp.is_main:
            print(f"[slimtune] early stopping at step {st.step}: no {metric} improvement "
                  f"in {st.bad_evals} evaluations", file=sys.stderr)
        return True
    return False


def _finish(loop: _Loop, stop: bool) -> dict[str, Any]:
    """Close the log, load the best evaluated weights, undo the parallel wrapper; the summary."""
    dp, st, cfg = loop.dp, loop.state, loop.cfg
    loop.progress.close()
    loop.log.close()
    barrier()
    best_path = loop.ckpt_dir / "best" / "trainable.safetensors"
    if best_path.is_file():  # finish on the best evaluated weights
        if dp.distributed:
            dp.load_trainable_state(load_file(str(best_path)))
        else:
            load_trainable_state(loop.model, load_file(str(best_path)))
    dp.finish()
    resumed = loop.resumed
    return {"steps": st.step, "epochs": st.epoch + st.batch / max(1, num_batches(len(loop.data), cfg.batch_size)),
            "best_step": st.best_step,
            f"best_{loop.metric}": None if st.best is None else loop.sign * st.best,
            "train_seconds": st.train_seconds, "samples": st.samples,
            "samples_per_s": st.samples / max(st.train_seconds, 1e-9),
            "tokens": st.tokens, "tokens_per_s": st.tokens / max(st.train_seconds, 1e-9),
            "stopped_early": stop, "peak_rss_mb": peak_rss_mb(),
            "precision": resolve_precision(cfg.precision, dp.device),
            "resumed_from_step": int(resumed.name.split("-")[1]) if resumed is not None else None,
            **({"world_size": dp.world, "parallel": dp.kind,
                "grad_sync_mb": dp.synced_bytes / 1e6} if dp.distributed else {})}


class _NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, step: int, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(cfg: TrainConfig, total: int, initial: int, main: bool = True) -> Any:

    disable = not main or not cfg.progress or not sys.stderr.isatty() or os.environ.get("SLIMTUNE_NO_PROGRESS") == "1"
    return tqdm(total=total, initial=initial, disable=disable, desc="train", dynamic_ncols=True)
