"""Data-parallel training on ``torch.distributed``: process group, launching, DDP / FSDP2, global checkpoints.

slimtune does not ship its own engine. ``slimtune finetune|distill --nproc N`` re-runs the same
command through ``torch.distributed.run`` (torchrun's elastic launcher); a job started by an
outer ``torchrun`` is detected from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``. Backend: NCCL
on GPUs, gloo on CPU.

The one training loop (:mod:`slimtune.train.loop`) talks to a :class:`Parallel`:

- ``train.batch_size`` is the *global* micro-batch. Every rank builds the same list of global
  batches (``data.epoch_batches`` is a pure function of seed and epoch) and takes its
  contiguous slice (:func:`local_slice`): the same partition a ``DistributedSampler`` gives,
  without a sampler object, and resumable at any micro-batch.
- Each rank scales its loss by ``world * len(slice) / len(global batch)``; DDP averages the
  gradients over ranks, so the step's gradient is exactly the mean over the global batch even
  when the slices are uneven.
- Checkpoints hold global state (step, epoch, global batch index), unsharded trainable weights
  and the full optimizer state: a run resumes with any number of processes, or with one.
- ``train.fsdp: true`` shards parameters, gradients and optimizer state (FSDP2 ``fully_shard``,
  FULL_SHARD) per transformer block; at the end the full weights are gathered to rank 0, which
  exports them (safetensors) like a single-process run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from slimtune.methods import load_trainable_state

# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank of this process on its node (picks its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """True on the process that logs, checkpoints, exports and prints (global rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (torchrun / torch.distributed.run)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str = "auto") -> bool:
    """Join the process group described by torchrun's environment; idempotent.

    Args:
        backend: ``auto`` (NCCL with CUDA, else gloo), ``nccl`` or ``gloo``.

    Returns:
        True when this job has more than one process.
    """
    if _initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # "cuda" without an index now means this rank's GPU (models moved with .to("cuda")).
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def device() -> torch.device:
    """This rank's device: its GPU (``cuda:LOCAL_RANK``) or the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op with one process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if _initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. build a cache once, then read it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def _comm_device() -> torch.device:
    return device() if _initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; no-op with one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the launcher's own flag)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(argv: Sequence[str], nproc: int | None) -> int | None:
    """Run ``slimtune ARGV`` again on ``nproc`` local processes through ``torch.distributed.run``.

    Args:
        argv: the command line after ``slimtune`` (``--nproc`` is removed from it).
        nproc: processes on this machine; None or 1 means "do not launch".

    Returns:
        The launcher's exit status, or None when the caller should simply run: ``nproc`` <= 1,
        or this process is already one rank of a torchrun job (then ``--nproc`` is ignored;
        torchrun's ``--nproc-per-node`` decides).
    """
    if nproc is None or nproc <= 1:
        return None
    if launched_by_torchrun():
        ws = os.environ.get("WORLD_SIZE")
        if is_main() and ws != str(nproc):
            print(f"[slimtune] --nproc {nproc} ignored: already running under torchrun with WORLD_SIZE={ws}",
                  file=sys.stderr)
        return None
    # --standalone: a local rendezvous on a free port, so concurrent jobs never collide. torchrun
    # sets OMP_NUM_THREADS=1 per process unless the caller set it (train.num_threads overrides).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "slimtune.cli.main", *strip_nproc(argv)]
    print(f"[slimtune] launching {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode


# --------------------------------------------------------------------------------------------
# Global batches
# --------------------------------------------------------------------------------------------


def local_slice(idx: Sequence[int], r: int, world: int) -> list[int]:
    """Rank ``r``'s contiguous part of a global batch; sizes differ by at most one.

    E.g. 7 examples on 2 ranks: rank 0 gets 4, rank 1 gets 3. With fewer examples than ranks
    some slices are empty (the loop then runs a zero-weight forward to keep collectives aligned).
    """
    n = len(idx)
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return list(idx[start:start + base + (1 if r < extra else 0)])


# --------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model (``model.config``,
    distillation's ``model.distill_projection``), so a loss function sees the same object."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "module":
                raise
            return getattr(super().__getattr__("module"), name)


def _block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the transformer blocks: Hugging Face's ``_no_split_modules`` (what
    Accelerate's FSDP auto-wrap uses), else the element type of homogeneous ModuleLists."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    if names:
        return names
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            names.add(type(m[0]).__name__)
    return names


def _split_off_params(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` that owns its parameters; ``model``'s become meta tensors.

    FSDP2 rewrites the module it shards (class swap, hooks, DTensor params). Sharding a copy
    keeps the caller's object a plain model, to be refilled with the gathered full weights on
    rank 0 at the end; its meta placeholders hold no memory meanwhile. Buffers are copied (small).
    """
    params = {id(p): p for p in model.parameters()}  # tied weights appear once
    work = copy.deepcopy(model, memo=dict(params))  # the memo makes the copy reuse the Parameters
    meta = {pid: torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for pid, p in params.items()}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in meta:
                mod._parameters[name] = meta[id(p)]
    return work


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it), else ``t``."""

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` placed like the DTensor ``like`` (every rank holds the same ``full``)."""

    if not isinstance(like, DTensor) or isinstance(full, DTensor) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)


class Parallel:
    """How this process takes part in training: one process, DDP, or FSDP2 (FULL_SHARD).

    Attributes:
        kind: ``single``, ``ddp`` or ``fsdp``.
        net: what the loss function calls (the DDP wrapper, the sharded model, or the model).
        module: the model whose parameters train (optimizer, method hooks, evaluation).
        world, rank: job size and this process's global rank.
        device: where batches go.
    """

    def __init__(self, model: torch.nn.Module, fsdp: bool = False, find_unused_parameters: bool = False):
        init_distributed()
        self.world, self.rank = world_size(), rank()
        self.is_main = self.rank == 0
        self._caller = model
        self.synced_bytes = 0
        if self.world == 1:
            self.kind, self.net, self.module = "single", model, model
            self.device = next(model.parameters()).device
            return
        self.device = device()
        if fsdp:

            self.kind = "fsdp"
            _check_same_init(model)
            # gradients reduce-scattered per step; weights are also all-gathered in forward and
            # backward (~1.5x DDP's traffic for a full fine-tune)
            self.synced_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            work = _split_off_params(model)
            mesh = init_device_mesh(self.device.type, (self.world,))
            blocks = _block_classes(work)
            for name, m in work.named_modules():
                # Shard each outermost block (one all-gather per block in forward), then the
                # root, which takes the rest (embeddings, head). FULL_SHARD: reshard after forward.
                if type(m).__name__ in blocks and not _inside_sharded(name, work):
                    fully_shard(m, mesh=mesh)
                    m._slimtune_sharded = True
            fully_shard(work, mesh=mesh)
            self.net = self.module = work
        else:
            self.kind = "ddp"
            model.to(self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Only parameters with requires_grad get gradient hooks: with LoRA only the adapter
            # (and head) gradients are all-reduced; the frozen base is never communicated.
            self.net = _DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
            self.module = model
            try:  # what DDP itself all-reduces per step (frozen weights excluded)
                self.synced_bytes = int(self.net._get_ddp_logging_data()["total_parameter_size_bytes"])
            except (AttributeError, KeyError, RuntimeError):
                self.synced_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    @property
    def distributed(self) -> bool:
        """True with more than one process."""
        return self.world > 1

    def local(self, idx: Sequence[int]) -> list[int]:
        """This rank's slice of a global micro-batch."""
        return list(idx) if self.world == 1 else local_slice(idx, self.rank, self.world)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient sync only on the last micro-batch of an accumulation group (``no_sync``)."""
        if self.kind == "ddp" and not last:
            return self.net.no_sync()
        if self.kind == "fsdp":
            self.net.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    # ---- weights and optimizer state, always in the unsharded single-process format -------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on rank 0 (CPU copies; empty dict elsewhere). Collective."""
        out: dict[str, torch.Tensor] = {}
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                t = _full(p.detach())
                if self.is_main:
                    out[n] = t.cpu().clone().contiguous()
        return out

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load full trainable weights (every rank holds ``state``) into the local model or shards."""

        if self.kind != "fsdp":
            load_trainable_state(self.module, state)
            return
        params = dict(self.module.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(_shard_like(t.to(params[n].dtype), params[n]))

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """``opt.state_dict()`` with sharded state gathered (rank 0 keeps it). Collective."""
        sd = opt.state_dict()
        if self.kind != "fsdp":
            return sd
        state = {}
        for i in sorted(sd["state"]):
            state[i] = {k: (_full(v).cpu() if isinstance(v, torch.Tensor) else v) for k, v in sd["state"][i].items()}
        return {"state": state, "param_groups": sd["param_groups"]} if self.is_main else {}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Load a full optimizer state dict, resharding its tensors like the parameters."""
        if self.kind == "fsdp":
            order = [p for g in opt.param_groups for p in g["params"]]  # state_dict's index order
            sd = {"param_groups": sd["param_groups"],
                  "state": {i: {k: (_shard_like(v, order[int(i)]) if isinstance(v, torch.Tensor) else v)
                                for k, v in s.items()} for i, s in sd["state"].items()}}
        opt.load_state_dict(sd)

    def rng_states(self) -> list[dict[str, Any]]:
        """Every rank's torch RNG state, gathered on all ranks (dropout streams per rank)."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, mine)
        return out

    def set_rng(self, states: list[dict[str, Any]] | None, seed: int, step: int) -> None:
        """Restore this rank's RNG from a checkpoint of the same world size, else derive it."""
        if states is not None and len(states) == self.world:
            torch.set_rng_state(states[self.rank]["torch"])
            if states[self.rank].get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(states[self.rank]["cuda"])
        elif self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank + step)

    def seed_ranks(self, seed: int) -> None:
        """Different dropout streams per rank (rank 0 keeps the single-process stream)."""
        if self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank)
            random.seed(seed + self.rank)

    def finish(self) -> None:
        """Give the caller its plain model back: full trained weights on rank 0 (FSDP gathers)."""
        if self.kind != "fsdp":
            return
        full: dict[str, torch.Tensor] = {}
        for n, p in self.module.named_parameters():
            t = _full(p.detach())  # collective: every rank, same order
            if self.is_main:
                full[n] = t.cpu()
        if self.is_main:
            _fill_params(self._caller, full)
        self.net = self.module = self._caller


def _inside_sharded(name: str, root: torch.nn.Module) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if getattr(root.get_submodule(".".join(parts[:i])), "_slimtune_sharded", False):
            return True
    return False


def _fill_params(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Replace ``model``'s (meta) parameters by ``full`` tensors, keeping tied weights tied."""
    named = dict(model.named_parameters())
    new = {id(named[n]): torch.nn.Parameter(t, requires_grad=named[n].requires_grad) for n, t in full.items()}
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[k] = new[id(p)]


def _check_same_init(model: torch.nn.Module) -> None:
    """FSDP shards each rank's own copy (no broadcast from rank 0): the copies must agree."""
    with torch.no_grad():
        s = sum(float(p.double().sum()) + float(p.double().abs().sum()) for p in model.parameters())
    t = torch.tensor([s, -s], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if abs(t[0].item() + t[1].item()) > 1e-6 * max(1.0, abs(s)):
        raise RuntimeError("FSDP: the ranks built different initial weights; seed every rank the same "
                           "(train.seed) before building the model")
