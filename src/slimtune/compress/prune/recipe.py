"""``slimtune prune``: make a fine-tuned classifier really smaller (and faster) by pruning.

A causal-LM folder goes to :mod:`slimtune.compress.prune.decoder_recipe` instead (depth, width,
vocabulary; it stays a causal LM); the settings of both are
:class:`slimtune.compress.prune.settings.PruneSettings`. For classifiers, the steps, each
optional, in this order:

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
``prune.yaml`` (the resolved settings: ``slimtune prune --config OUT/prune.yaml`` repeats the run;
``prune.json`` holds the same), ``recipe.yaml`` (the recovery run, if any) and, for unstructured
sparsity, ``sparsity.json`` and possibly ``sparse/model.safetensors``. The folder is written in
one atomic step after every setting was validated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.compress.distill.losses import kd_loss
from slimtune.compress.prune.decoder_recipe import prune_decoder_to_dir
from slimtune.compress.prune.settings import SETTINGS_FILE, PruneSettings
from slimtune.compress.prune.structured import encoder_layers, prune_structured
from slimtune.compress.prune.vocab import prune_vocabulary, read_corpus_texts
from slimtune.config.defaults import method_defaults
from slimtune.config.fields import save_settings
from slimtune.config.recipe import DataConfig, ModelConfig, Recipe, TrainConfig
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.evaluate.evaluator import evaluate_classifier
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.methods import MethodContext, get_method
from slimtune.models.loading import count_params, label_names_of, load_model, load_tokenizer
from slimtune.train.finetune import seed_everything
from slimtune.train.loop import default_loss, train


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


@dataclass
class _State:
    """What the pruning steps hand on: the model being pruned and what it is measured with."""

    model: Any
    tokenizer: Any
    labels: list[str]
    teacher: Any
    result: dict[str, Any]
    new_to_old: Any = None
    train_data: Any = None


def prune_to_dir(s: PruneSettings, log: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`run_prune`, also returning the in-memory pruned ``(model, tokenizer, metrics)``.

    Everything is validated first; the output folder (weights, tokenizer, ``metrics.json``,
    ``prune.yaml`` = ``s``, ...) is written in one atomic step, so a failed run leaves no half
    of one (and an older output untouched).
    """
    say = log or (lambda msg: print(f"[slimtune prune] {msg}", file=sys.stderr))
    s.validate()
    if s.is_decoder():  # a causal LM stays a causal LM: depth, width and vocabulary of the decoder
        return prune_decoder_to_dir(s, say)
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    seed_everything(s.seed)
    out = Path(s.output)
    t_start = time.perf_counter()
    with atomic_dir(out) as tmp:
        st = _setup_model(s)
        _step_vocab(s, st, tmp, say)  # first: every later step sees the new ids
        _setup_train_data(s, st)
        _step_structured(s, st, say)
        method, mcfg, ctx, tcfg, summary = _step_recover(s, st, tmp, say)
        _step_export(s, st, method, mcfg, ctx, tcfg, out, tmp, say)
        _step_evaluate(s, st)
        r = st.result
        r.update(params=count_params(st.model), size_mb=weights_size_mb(tmp), train=summary,
                 seconds=time.perf_counter() - t_start)
        r["params_ratio"] = r["params_before"] / r["params"]
        atomic_write_json(tmp / "metrics.json", r)
        saved = dataclasses.replace(s, overwrite=False)  # a repeat from prune.yaml asks again before replacing
        atomic_write_json(tmp / "prune.json", dataclasses.asdict(saved))
        save_settings(saved, tmp / SETTINGS_FILE)
    return st.model, st.tokenizer, st.result


def _setup_model(s: PruneSettings) -> _State:
    """Load the tokenizer and classifier (and a frozen copy as the KD teacher)."""
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model, "classification")
    result: dict[str, Any] = {"task": "classification", "method": "prune", "base_model": s.model,
                              "params_before": count_params(model)}
    return _State(model, tokenizer, _label_names(model), copy.deepcopy(model) if s.kd else None, result)


def _step_vocab(s: PruneSettings, st: _State, tmp: Path, say: Any) -> None:
    """Vocabulary pruning: exact for the corpus text (the new tokenizer files go to ``tmp/.tokenizer-tmp``)."""
    files = s.vocab_files()
    if not files:
        return
    texts = read_corpus_texts(files)
    st.tokenizer, st.new_to_old, info = prune_vocabulary(st.model, st.tokenizer, texts, tmp / ".tokenizer-tmp",
                                                         min_count=s.vocab_min_count, keep_chars=s.vocab_keep_chars)
    info["files"] = list(files)
    st.result["vocab"] = info
    say(f"vocabulary {info['vocab_size_before']} -> {info['vocab_size_after']} tokens")


def _setup_train_data(s: PruneSettings, st: _State) -> None:
    if s.train:
        tr = load_classification(s.train, label_names=st.labels, max_rows=s.max_train_samples, seed=s.seed)
        st.train_data = tokenize_classification(tr, st.tokenizer, s.max_length)


def _step_structured(s: PruneSettings, st: _State, say: Any) -> None:
    """Whole layers and FFN neurons: a smaller dense model of the same architecture."""
    if not (s.layers or s.keep_layers or s.ffn):
        return
    importance = "taylor" if s.importance == "auto" else s.importance
    layers = s.layers_to_remove(len(encoder_layers(st.model)))
    st.model, info = prune_structured(st.model, ffn=s.ffn, layers=layers, importance=importance,
                                      data=st.train_data, num_batches=s.importance_batches, seed=s.seed)
    st.result["structured"] = info
    say(f"layers {info['layers_before']} -> {info['layers_after']} (dropped {info['dropped_layers']}), "
        f"FFN {info['intermediate_before']} -> {info['intermediate_after']} per layer")


def _step_recover(s: PruneSettings, st: _State, tmp: Path, say: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Recovery training (and gradual unstructured pruning) through the one training loop.

    Returns:
        ``(method, method config, context, train config, training summary or None)``.
    """
    unstructured = s.sparsity > 0 or s.pattern != "unstructured"
    method = get_method("magnitude" if unstructured else "full")
    if unstructured:
        mcfg = method.config_cls(sparsity=s.sparsity, pattern=s.pattern, scope=s.scope,
                                 schedule=s.schedule if s.recover_steps else "oneshot",
                                 sparse_sidecar=s.sparse_sidecar)
        mcfg.validate()
    else:
        mcfg = method.config_cls()
    lr = s.lr if s.lr is not None else method_defaults(method, "classification")["train.lr"]
    if s.recover_steps > 0:
        say(f"recovery lr {lr:g} ({'user' if s.lr is not None else f'default of method {method.name}'})")
    tcfg = TrainConfig(max_steps=max(1, s.recover_steps), batch_size=s.batch(False), lr=lr, warmup_ratio=0.06,
                       seed=s.seed, tensorboard=False, resume=False, log_every=10)
    ctx = MethodContext(task="classification", total_steps=max(1, s.recover_steps), base_model=s.model)
    st.model = method.apply(st.model, mcfg, ctx)
    summary = None
    if s.recover_steps > 0:
        teacher = st.teacher
        loss_fn = (kd_loss_fn(teacher, st.new_to_old, s.kd_temperature, s.kd_alpha)
                   if teacher is not None else default_loss)
        say(f"recovery training: {s.recover_steps} steps{' with KD from the unpruned model' if teacher else ''}")
        # No eval_fn: the final weights are used, never ones picked on the evaluation file.
        summary = train(st.model, method, mcfg, st.train_data, tcfg, tmp, total_steps=s.recover_steps,
                        loss_fn=loss_fn)
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    st.teacher = None
    return method, mcfg, ctx, tcfg, summary


def _step_export(s: PruneSettings, st: _State, method: Any, mcfg: Any, ctx: Any, tcfg: Any, out: Path,
                 tmp: Path, say: Any) -> None:
    """config.json + model.safetensors (+ sparsity report) by the method; tokenizer and recovery recipe beside."""
    st.model = method.export(st.model, mcfg, tmp, ctx)
    st.tokenizer.save_pretrained(tmp)
    tok_dir = tmp / ".tokenizer-tmp"
    if st.new_to_old is not None:  # the rewritten tokenizer.json / vocab.txt, not a re-serialisation
        for name in ("tokenizer.json", "vocab.txt"):
            shutil.copyfile(tok_dir / name, tmp / name)
    shutil.rmtree(tok_dir, ignore_errors=True)
    if s.recover_steps > 0:  # the recovery run, repeatable with `slimtune finetune --config`
        recipe = Recipe(output=str(out), model=ModelConfig(name=s.model), data=DataConfig(
            train=s.train, eval=s.eval, max_length=s.max_length, max_train_samples=s.max_train_samples),
            train=tcfg, method=mcfg, method_name=method.name)
        recipe.save(tmp / "recipe.yaml")
    if method.name == "magnitude":
        st.result["sparsity"] = rep = json.loads((tmp / "sparsity.json").read_text())
        say(f"unstructured sparsity {rep['pruned_weights_sparsity']:.1%} of pruned weights "
            f"({rep['model_sparsity']:.1%} of the model); dense file size unchanged by zeros")


def _step_evaluate(s: PruneSettings, st: _State) -> None:
    if s.eval:
        ev = load_classification(s.eval, label_names=st.labels, max_rows=s.max_eval_samples, seed=s.seed)
        st.result.update(evaluate_classifier(st.model, tokenize_classification(ev, st.tokenizer, s.max_length),
                                             st.labels))
        st.result["eval_file"] = s.eval
