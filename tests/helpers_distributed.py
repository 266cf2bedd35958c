"""Tiny-model scenarios run both by pytest (one process) and by torchrun (2 ranks, gloo).

``python -m torch.distributed.run --nproc-per-node 2 tests/helpers_distributed.py ROOT`` runs
every scenario of :data:`WORKER_SCENARIOS` on each rank with the library API; rank 0 writes the
weights under ``ROOT/<scenario>/``. The tests compare them with single-process runs of the same
functions. Dropout is off in the tiny model so runs are deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tiny import make_tiny_bert, sentiment_rows, write_tsv

# Global micro-batch 7 on 2 ranks: slices of 4 and 3 (uneven on purpose); 101 rows: the last
# batch of an epoch has 3 rows; grad_accum 2 exercises no_sync.
TRAIN = {"batch_size": 7, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.0, "tensorboard": False,
         "progress": False, "log_every": 1}
STEPS = 10  # > one epoch (8 optimizer steps)
HALF = 5  # resume point


def make_assets(root: Path) -> tuple[Path, Path, Path]:
    """Tiny BERT without dropout, 101 training rows, 40 eval rows."""
    model_dir = make_tiny_bert(root / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                               classifier_dropout=0.0)
    train_f = write_tsv(root / "train.tsv", sentiment_rows(101, seed=1))
    eval_f = write_tsv(root / "eval.tsv", sentiment_rows(40, seed=2))
    return model_dir, train_f, eval_f


def _setup(root: Path, method_name: str = "full", **train: Any) -> tuple[Any, Any, Any, Any, Any]:
    from slimtune.config.recipe import TrainConfig
    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.methods import MethodContext, get_method
    from slimtune.models.loading import load_model, load_tokenizer

    model_dir = root / "bert"
    tok = load_tokenizer(str(model_dir))
    raw = load_classification(root / "train.tsv")
    data = tokenize_classification(raw, tok, 32)
    torch.manual_seed(0)  # the same LoRA init on every rank and in the reference
    model = load_model(str(model_dir), "classification", label_names=raw.label_names)
    method = get_method(method_name)
    mcfg = method.config_cls(**({"dropout": 0.0} if method_name == "lora" else {}))
    ctx = MethodContext(task="classification", total_steps=STEPS, base_model=str(model_dir))
    model = method.apply(model, mcfg, ctx)
    return model, method, mcfg, data, TrainConfig(**{**TRAIN, **train})


def run(root: Path, name: str, out: Path) -> dict[str, Any]:
    """Run scenario ``name`` (on however many ranks this process belongs to); outputs under ``out``.

    Returns the training summary; rank 0 also writes ``out/weights.safetensors`` (the trainable
    weights) and ``out/summary.json``.
    """
    from slimtune.methods import MethodContext, trainable_state
    from slimtune.train.distributed import is_main
    from slimtune.train.loop import train

    method_name = "lora" if name.startswith("lora") else "full"
    train_cfg: dict[str, Any] = {}
    total, loss_fn = STEPS, None
    if "fsdp" in name:
        train_cfg["fsdp"] = True
    if name.endswith(("phase1", "phase2")):  # constant LR: the schedule does not depend on total
        train_cfg.update(scheduler="constant", save_every=1000)
        total = HALF if name.endswith("phase1") else STEPS
    model, method, mcfg, data, cfg = _setup(root, method_name, **train_cfg)
    if name == "distill":  # student = 1 layer of the teacher, live teacher (no cache)
        from slimtune.compress.distill.recipe import DistillLoss
        from slimtune.compress.distill.settings import DistillConfig
        from slimtune.compress.distill.student import build_student
        from slimtune.models.loading import load_model

        teacher = load_model(str(root / "bert"), "classification", label_names=["0", "1"]).eval()
        teacher.requires_grad_(False)
        model, _ = build_student(teacher, layers=1)
        model = method.apply(model, mcfg, MethodContext("classification", STEPS, str(root / "bert")))
        loss_fn = DistillLoss(teacher, DistillConfig(student_layers=1, alpha=0.3), causal=False)
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    summary = train(model, method, mcfg, data, cfg, out, total_steps=total, **kw)
    if is_main():
        save_file(trainable_state(model), str(out / "weights.safetensors"))
        (out / "summary.json").write_text(json.dumps(summary))
        if name == "fsdp":  # sharded-to-full export: the plain model again, on rank 0
            method.export(model, mcfg, out / "export", MethodContext("classification", STEPS, str(root / "bert")))
    return summary


# What the 2-rank worker runs, in order. ddp_phase2 resumes a checkpoint that pytest wrote with
# one process (under ROOT/single_phase1 copied to ROOT/ddp_phase2 before launching).
WORKER_SCENARIOS = ("lora", "lora_fsdp", "fsdp", "fsdp_phase1", "ddp_phase2", "distill")


def worker_main(root: Path) -> None:
    """Entry point under torchrun: every scenario, then leave the process group."""
    from slimtune.train.distributed import teardown

    try:
        for name in WORKER_SCENARIOS:
            run(root, name, root / name)
    finally:
        teardown()


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
