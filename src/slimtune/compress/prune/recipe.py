"""``slimtune prune``: make a fine-tuned classifier really smaller (and faster) by pruning.

Steps, each optional, in this order:

1. vocabulary pruning (``--vocab-from FILE...``, :mod:`slimtune.compress.prune.vocab`): exact on corpus text;
2. structured pruning of whole layers (``--layers N``) and FFN neurons (``--ffn F``)
   (:mod:`slimtune.compress.prune.structured`): a smaller dense model of the same architecture.
   ``--heads`` is refused with the reason (plain transformers cannot describe fewer heads of
   the same width in a BERT-family config; see that module);
3. recovery fine-tuning (``--recover-steps N``) through :func:`slimtune.train.loop.train`, optionally
   distilling from the unpruned model (``--kd``); with ``--sparsity S`` this run also prunes
   unstructured weights on the cubic schedule (method ``magnitude``,
   :mod:`slimtune.methods.magnitude`), or N:M with ``--pattern 2:4``.

The output folder holds ``config.json`` + ``model.safetensors`` + tokenizer (plain transformers
loads them), ``metrics.json`` (accuracy on ``--eval``, params, size, what was pruned),
``prune.json`` (the settings), ``recipe.yaml`` (the recovery run, if any) and, for unstructured
sparsity, ``sparsity.json`` and possibly ``sparse/model.safetensors``.

Top-level imports are stdlib only (the CLI is built without importing torch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.compress.distill.losses import kd_loss
from slimtune.compress.prune.structured import HEADS_UNSUPPORTED, prune_structured
from slimtune.compress.prune.vocab import prune_vocabulary, read_corpus_texts
from slimtune.config.fields import RecipeError
from slimtune.config.recipe import DataConfig, ModelConfig, Recipe, TrainConfig
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.evaluate.evaluator import evaluate_classifier
from slimtune.io import atomic_write_json, update_json, weights_size_mb
from slimtune.methods import MethodContext, get_method
from slimtune.models.loading import count_params, label_names_of, load_model, load_tokenizer
from slimtune.train.finetune import seed_everything
from slimtune.train.loop import default_loss, train


@dataclass
class PruneSettings:
    """Everything ``slimtune prune`` does; saved as ``prune.json`` beside the output."""

    model: str
    output: str
    train: str | None = None
    eval: str | None = None
    sparsity: float = 0.0
    pattern: str = "unstructured"
    scope: str = "global"
    schedule: str = "gradual"
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    importance: str = "taylor"
    importance_batches: int = 8
    vocab_from: list[str] = field(default_factory=list)
    vocab_min_count: int = 1
    vocab_keep_chars: bool = True
    recover_steps: int = 0
    kd: bool = False
    kd_temperature: float = 2.0
    kd_alpha: float = 0.5
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 42
    num_threads: int = 0
    sparse_sidecar: str = "auto"

    def validate(self) -> None:
        """Check ranges and files before any weight is loaded (errors name the flag)."""

        if not 0 <= self.sparsity < 1:
            raise RecipeError(f"--sparsity: must be in [0, 1), got {self.sparsity}")
        for name in ("heads", "ffn"):
            if not 0 <= getattr(self, name) < 1:
                raise RecipeError(f"--{name}: the fraction to remove must be in [0, 1), got {getattr(self, name)}")
        if self.heads:

            raise RecipeError(f"--heads: {HEADS_UNSUPPORTED}")
        if self.layers < 0:
            raise RecipeError(f"--layers: must be >= 0, got {self.layers}")
        if self.importance not in ("magnitude", "taylor"):
            raise RecipeError(f"--importance: {self.importance!r} is not one of ['magnitude', 'taylor']")
        if self.recover_steps < 0:
            raise RecipeError(f"--recover-steps: must be >= 0, got {self.recover_steps}")
        if self.vocab_min_count < 1:
            raise RecipeError(f"--vocab-min-count: must be >= 1, got {self.vocab_min_count}")
        needs_train = self.recover_steps > 0 or self.layers or (self.ffn and self.importance == "taylor")
        if needs_train and not self.train:
            raise RecipeError("--train is required for recovery training and taylor importance")
        if not (self.sparsity or self.layers or self.ffn or self.vocab_from or self.pattern != "unstructured"):
            raise RecipeError("nothing to prune: give --sparsity, --pattern, --layers, --ffn or --vocab-from")
        if self.kd and self.recover_steps == 0:
            raise RecipeError("--kd distils during recovery training: also give --recover-steps N")
        for flag, path in (("--train", self.train), ("--eval", self.eval), *(("--vocab-from", v) for v in self.vocab_from)):
            if path is not None and not Path(path).is_file():
                raise RecipeError(f"{flag}: file not found: {path}")
        if not Path(self.model).exists() and self.model not in ("minilm",):
            raise RecipeError(f"--model: no such model folder: {self.model}")


def kd_loss_fn(teacher: Any, new_to_old: Any = None, temperature: float = 2.0, alpha: float = 0.5) -> Any:
    """Loss ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    Hinton et al. (2015) logit distillation through :func:`slimtune.compress.distill.losses.kd_loss`
    (whose ``alpha`` weighs the hard loss, hence ``1 - alpha`` below). ``new_to_old`` maps a
    pruned vocabulary's ids back to the teacher's ids, so the unpruned teacher sees the same tokens.
    """

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch)
        tbatch = {k: v for k, v in batch.items() if k != "labels"}
        if new_to_old is not None:
            tbatch["input_ids"] = new_to_old.to(batch["input_ids"].device)[batch["input_ids"]]
        with torch.no_grad():
            t_logits = teacher(**tbatch).logits.float()
        return kd_loss(out.logits, t_logits, out.loss, alpha=1.0 - alpha, temperature=temperature)

    return loss_fn


def _label_names(model: Any) -> list[str]:

    names = label_names_of(model)
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    return names


def run_prune(s: PruneSettings, log: Any = None) -> dict[str, Any]:
    """Prune as ``s`` says; write the output folder; return the metrics written to metrics.json."""
    return prune_to_dir(s, log)[2]


def prune_to_dir(s: PruneSettings, log: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`run_prune`, also returning the in-memory pruned ``(model, tokenizer, metrics)``."""

    say = log or (lambda msg: print(f"[slimtune prune] {msg}", file=sys.stderr))
    s.validate()
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    seed_everything(s.seed)
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "sparsity.json", "sparse"):  # a rerun must not mix old results in
        p = out / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    atomic_write_json(out / "prune.json", dataclasses.asdict(s))
    t_start = time.perf_counter()
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model, "classification")
    labels = _label_names(model)
    params_before = count_params(model)
    teacher = None
    if s.kd:

        teacher = copy.deepcopy(model)
    result: dict[str, Any] = {"task": "classification", "method": "prune", "base_model": s.model,
                              "params_before": params_before}

    # 1. vocabulary: exact for corpus text; done first so every later step sees the new ids.
    new_to_old = None
    tok_dir = out / ".tokenizer-tmp"
    if s.vocab_from:

        texts = read_corpus_texts(s.vocab_from)
        tokenizer, new_to_old, info = prune_vocabulary(model, tokenizer, texts, tok_dir,
                                                       min_count=s.vocab_min_count, keep_chars=s.vocab_keep_chars)
        info["files"] = list(s.vocab_from)
        result["vocab"] = info
        say(f"vocabulary {info['vocab_size_before']} -> {info['vocab_size_after']} tokens")

    train_data = None
    if s.train:
        tr = load_classification(s.train, label_names=labels, max_rows=s.max_train_samples, seed=s.seed)
        train_data = tokenize_classification(tr, tokenizer, s.max_length)

    # 2. whole layers and FFN neurons: a smaller dense model of the same architecture.
    if s.layers or s.ffn:

        model, info = prune_structured(model, ffn=s.ffn, layers=s.layers, importance=s.importance,
                                       data=train_data, num_batches=s.importance_batches, seed=s.seed)
        result["structured"] = info
        say(f"layers {info['layers_before']} -> {info['layers_after']} (dropped {info['dropped_layers']}), "
            f"FFN {info['intermediate_before']} -> {info['intermediate_after']} per layer")

    # 3. recovery training (and gradual unstructured pruning) through the one training loop.
    unstructured = s.sparsity > 0 or s.pattern != "unstructured"
    method = get_method("magnitude" if unstructured else "full")
    if unstructured:
        mcfg = method.config_cls(sparsity=s.sparsity, pattern=s.pattern, scope=s.scope,
                                 schedule=s.schedule if s.recover_steps else "oneshot",
                                 sparse_sidecar=s.sparse_sidecar)
        mcfg.validate()
    else:
        mcfg = method.config_cls()
    tcfg = TrainConfig(max_steps=max(1, s.recover_steps), batch_size=s.batch_size, lr=s.lr, warmup_ratio=0.06,
                       seed=s.seed, tensorboard=False, resume=False, log_every=10)
    ctx = MethodContext(task="classification", total_steps=max(1, s.recover_steps), base_model=s.model)
    model = method.apply(model, mcfg, ctx)
    summary = None
    if s.recover_steps > 0:

        loss_fn = kd_loss_fn(teacher, new_to_old, s.kd_temperature, s.kd_alpha) if teacher is not None else default_loss
        say(f"recovery training: {s.recover_steps} steps{' with KD from the unpruned model' if teacher else ''}")
        # No eval_fn: the final weights are used, never ones picked on the evaluation file.
        summary = train(model, method, mcfg, train_data, tcfg, out, total_steps=s.recover_steps, loss_fn=loss_fn)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    del teacher

    # Export: method writes config.json + model.safetensors (+ sparsity report); tokenizer beside.
    model = method.export(model, mcfg, out, ctx)
    tokenizer.save_pretrained(out)
    if s.vocab_from:  # the rewritten tokenizer.json / vocab.txt, not a re-serialisation
        for name in ("tokenizer.json", "vocab.txt"):
            shutil.copyfile(tok_dir / name, out / name)
        shutil.rmtree(tok_dir, ignore_errors=True)
    if s.recover_steps > 0:  # the recovery run, repeatable with `slimtune finetune --config`
        recipe = Recipe(output=str(out), model=ModelConfig(name=s.model), data=DataConfig(
            train=s.train, eval=s.eval, max_length=s.max_length, max_train_samples=s.max_train_samples),
            train=tcfg, method=mcfg, method_name=method.name)
        recipe.save(out / "recipe.yaml")
    if unstructured:
        result["sparsity"] = json.loads((out / "sparsity.json").read_text())
        rep = result["sparsity"]
        say(f"unstructured sparsity {rep['pruned_weights_sparsity']:.1%} of pruned weights "
            f"({rep['model_sparsity']:.1%} of the model); dense file size unchanged by zeros")
    if s.eval:
        ev = load_classification(s.eval, label_names=labels, max_rows=s.max_eval_samples, seed=s.seed)
        result.update(evaluate_classifier(model, tokenize_classification(ev, tokenizer, s.max_length), labels))
        result["eval_file"] = s.eval
    result.update(params=count_params(model), size_mb=weights_size_mb(out), train=summary,
                  seconds=time.perf_counter() - t_start)
    result["params_ratio"] = params_before / result["params"]
    update_json(out / "metrics.json", result)
    return model, tokenizer, result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------






