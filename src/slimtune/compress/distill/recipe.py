"""Knowledge distillation: a smaller student learns from a frozen teacher, in the one training loop.

Distillation is fine-tuning with another loss: ``run_distill`` builds the student (kept teacher
layers, a narrower fresh model, or a given folder), freezes the teacher, and calls
:func:`slimtune.train.loop.train` with a :class:`DistillLoss`. Pieces live one concept per file:

- ``distill_student.py``: student construction (layer map, narrow init);
- ``distill_losses.py``: logit KD (forward/reverse KL, T²), hidden-state MSE, attention KL;
- ``distill_cache.py``: teacher logits cached on disk (safetensors), keyed by content hashes.

The recipe is the fine-tune recipe (``model.name`` is the *teacher*) plus a ``distill`` section
(:class:`DistillConfig`); both are saved as ``recipe.yaml`` beside the student.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from slimtune.compress.distill.cache import hash_files, hash_state, teacher_cache
from slimtune.compress.distill.losses import (
    attention_kl,
    causal_kd_mask,
    hidden_mse,
    kd_loss,
    uniform_hidden_map,
)
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.distill.student import build_student
from slimtune.config.fields import RecipeError
from slimtune.data.datasets import (
    ClassificationData,
    DataError,
    load_classification,
    tokenize_classification,
)
from slimtune.evaluate.evaluator import classification_metrics
from slimtune.io import update_json, weights_size_mb
from slimtune.methods import MethodContext, get_method
from slimtune.models.loading import (
    cache_dir,
    count_params,
    label_names_of,
    load_model,
    load_tokenizer,
    resolve,
)
from slimtune.train import distributed
from slimtune.train.finetune import evaluate_any, export_model, prepare_data, seed_everything
from slimtune.train.loop import peak_rss_mb, plan_steps, train

# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


class DistillLoss:
    """``loss_fn(model, batch)`` for :func:`slimtune.train.loop.train`: hard CE + KD terms.

    The teacher is frozen (eval mode, no grad). Teacher logits come from ``cache`` (looked up
    by the batch's ``example_ids``) or from a live teacher forward; hidden states and attention
    maps always come live. A projection for hidden states of different width is read from
    the student's ``distill_projection`` submodule (so the loop's optimizer trains it).
    """

    def __init__(self, teacher: Any, cfg: DistillConfig, causal: bool, cache: Any = None,
                 hidden_map: list[int] | None = None, layer_map: list[int] | None = None,
                 unlabeled_rows: bool = False):
        self.teacher, self.cfg, self.causal, self.cache = teacher, cfg, causal, cache
        # Transfer-set rows carry label -100: the hard CE then averages over the labelled rows of
        # each batch only (the model's own loss is NaN on a batch without any).
        self.unlabeled_rows = unlabeled_rows
        self.hidden_map, self.layer_map = hidden_map, layer_map
        self.use_hidden = cfg.intermediate and cfg.hidden_weight > 0
        self.use_attn = cfg.intermediate and cfg.attention_weight > 0
        self.last: dict[str, float] = {}  # the terms of the last batch (for tests and logs)

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:

        ids = batch.pop("example_ids", None)
        extra = {}
        if self.use_hidden:
            extra["output_hidden_states"] = True
        if self.use_attn:
            extra["output_attentions"] = True
        if self.unlabeled_rows:
            labels = batch.pop("labels")
            out = model(**batch, **extra)
            hard = masked_ce(out.logits, labels)
        else:
            out = model(**batch, **extra)
            hard = out.loss
        cfg = self.cfg
        if cfg.alpha >= 1.0 and not cfg.intermediate:
            self.last = {"hard": float(hard.detach())}
            return hard
        t_out = None
        if self.cache is None or cfg.intermediate:
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                t_out = self.teacher(**inputs, **extra)
        loss = hard
        terms: dict[str, float] = {"hard": float(hard.detach())}
        if cfg.alpha < 1.0:
            if self.cache is not None and not cfg.intermediate:
                if ids is None:
                    raise ValueError("cached teacher logits need example_ids in the batch (TokenizedData.example_ids)")
                t_logits = self.cache.rows(ids).to(out.logits.device)
            else:
                t_logits = t_out.logits.float()
            s_logits, mask = out.logits, None
            if self.causal:  # position t predicts token t+1: drop the last position, mask padding
                s_logits, t_logits, mask = s_logits[:, :-1], t_logits[:, :-1], causal_kd_mask(batch["labels"])
            loss = kd_loss(s_logits, t_logits, hard, cfg.alpha, cfg.temperature, mask, cfg.kl_direction,
                           cfg.logit_loss)
            terms["kd"] = float(loss.detach())
        if self.use_hidden:
            proj = getattr(model, "distill_projection", None)
            h = hidden_mse(out.hidden_states, t_out.hidden_states, self.hidden_map, batch["attention_mask"], proj)
            loss = loss + cfg.hidden_weight * h
            terms["hidden"] = float(h.detach())
        if self.use_attn:
            a = attention_kl(out.attentions, t_out.attentions, self.layer_map, batch["attention_mask"])
            loss = loss + cfg.attention_weight * a
            terms["attention"] = float(a.detach())
        self.last = terms
        return loss


def masked_ce(logits: Any, labels: Any) -> Any:
    """Mean cross-entropy over the rows with a label (>= 0); 0 (with a graph) when there are none.

    Args:
        logits: (B, C) student logits.
        labels: (B,) class ids, -100 for transfer-set rows.
    """

    n = (labels >= 0).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") / n


def add_transfer_set(recipe: Any, dcfg: DistillConfig, data: list[tuple[Any, Any]]) -> dict[str, int]:
    """Append the transfer set (``distill.unlabeled``) to training data, with label -100.

    Args:
        recipe: the resolved recipe (column names, max_length, seed).
        dcfg: the distill section.
        data: distinct (TokenizedData, tokenizer) pairs to extend, the teacher's first: its
            token ids decide which rows duplicate a labelled row (dropped, as are repeats).

    Returns:
        Counts: ``read`` rows, ``duplicates`` dropped, ``added`` rows.
    """

    d = recipe.data
    (first, first_tok), rest = data[0], data[1:]
    texts: list[str] = []
    pairs: list[str] = []
    for f in dcfg.unlabeled or []:
        cd = load_classification(f, text_column=d.text_column, text_pair_column=d.text_pair_column,
                                 require_labels=False, skip_bad_rows=d.skip_bad_rows, encoding=d.encoding)
        if (cd.pairs is not None) != first.pairs:
            what = "sentence pairs" if first.pairs else "single texts"
            raise DataError(f"{f}: the training data {d.train} holds {what}; this transfer-set file does not "
                            f"(columns {cd.columns})")
        texts += cd.texts
        pairs += cd.pairs or []
    rows = ClassificationData("transfer set", texts, pairs or None, None, [], 0, {})
    enc = tokenize_classification(rows, first_tok, d.max_length)
    seen = {tuple(x) for x in first.input_ids}
    keep = []
    for i, ids in enumerate(enc.input_ids):
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            keep.append(i)
    dupes = len(texts) - len(keep)
    if dcfg.max_unlabeled_samples is not None and dcfg.max_unlabeled_samples < len(keep):
        keep = sorted(random.Random(recipe.train.seed).sample(keep, dcfg.max_unlabeled_samples))
    kept = ClassificationData("transfer set", [texts[i] for i in keep], [pairs[i] for i in keep] if pairs else None,
                              None, [], 0, {})
    for td, extra in [(first, _subset(enc, keep))] + [(td, tokenize_classification(kept, tok, d.max_length))
                                                       for td, tok in rest]:
        td.input_ids = td.input_ids + extra.input_ids
        if td.token_type_ids is not None:  # same tokenizer as extra's, so extra has them too
            td.token_type_ids = td.token_type_ids + extra.token_type_ids
        td.labels = td.labels + [-100] * len(keep)
    return {"read": len(texts), "duplicates": dupes, "added": len(keep)}


def _subset(data: Any, keep: list[int]) -> Any:
    """The rows ``keep`` of a TokenizedData (ids and token types only; no labels)."""

    tt = data.token_type_ids
    return dataclasses.replace(data, input_ids=[data.input_ids[i] for i in keep],
                               token_type_ids=[tt[i] for i in keep] if tt is not None else None)


def intermediate_maps(n_student: int, n_teacher: int, kept: list[int] | None) -> tuple[list[int], list[int]]:
    """(hidden map, attention layer map): teacher index for each student hidden state / layer.

    A student built from kept layers matches each layer with the teacher layer it came from;
    otherwise the uniform TinyBERT map is used.
    """

    hidden = [0] + [k + 1 for k in kept] if kept is not None else uniform_hidden_map(n_student, n_teacher)
    return hidden, [h - 1 for h in hidden[1:]]


def attach_projection(student: Any, d_student: int, d_teacher: int) -> None:
    """Give the student a trainable ``distill_projection`` (d_s → d_t) when widths differ.

    As a submodule it is in ``model.parameters()``: the loop's optimizer, gradient clipping and
    checkpoints include it with no change to the loop. :func:`detach_projection` removes it
    before export, so the saved student is a plain transformers model.
    """

    if d_student != d_teacher:
        student.add_module("distill_projection", torch.nn.Linear(d_student, d_teacher).to(
            next(student.parameters()).device))


def detach_projection(student: Any) -> None:
    """Remove the training-only projection (no-op if absent)."""
    if "distill_projection" in getattr(student, "_modules", {}):
        del student._modules["distill_projection"]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _same_vocab(a: Any, b: Any) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def run_distill(recipe: Any, dcfg: DistillConfig | None = None) -> dict[str, Any]:
    """Distil ``recipe.model.name`` (the teacher) into a student; write it and ``metrics.json``.

    ``dcfg`` defaults to the recipe's ``distill`` section. The recipe, with ``dcfg`` as its
    ``distill`` section, is saved as ``recipe.yaml``: ``slimtune distill --config`` repeats the run.

    Returns the metrics: student accuracy/macro-F1 (or perplexity), teacher's, retention,
    parameter counts and sizes, the layer map, the cache status and the training summary.
    """

    if dcfg is None:
        if recipe.distill is None:
            raise RecipeError("distill: the recipe has no distill section (say how to build the student)")
        dcfg = recipe.distill
    t, m = recipe.train, recipe.model
    causal = m.task == "causal-lm"
    out = Path(recipe.output or "outputs/distill")
    out.mkdir(parents=True, exist_ok=True)
    dataclasses.replace(recipe, distill=dcfg).save(out / "recipe.yaml")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    seed_everything(t.seed)

    distributed.init_distributed()  # under torchrun: join the group, pick this rank's GPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_path = resolve(m.name)

    # --- data: the teacher's tokenization, and the student's if its vocabulary differs
    t_tok = load_tokenizer(m.name, m.trust_remote_code)
    t_train, t_eval, labels = prepare_data(recipe, t_tok)
    s_tok, s_train, s_eval = t_tok, t_train, t_eval
    if dcfg.student is not None:
        s_tok = load_tokenizer(dcfg.student, m.trust_remote_code)
        if not _same_vocab(s_tok, t_tok):
            if causal or dcfg.intermediate:
                raise RecipeError("distill.student: its tokenizer differs from the teacher's; cross-tokenizer "
                                  "distillation works only for classifier logits without intermediate KD")
            s_train, s_eval, _ = prepare_data(recipe, s_tok)

    transfer = None
    if dcfg.unlabeled:
        n_labelled = len(t_train)
        distinct = [(t_train, t_tok)] + ([(s_train, s_tok)] if s_train is not t_train else [])
        transfer = add_transfer_set(recipe, dcfg, distinct)
        print(f"[slimtune] transfer set: {transfer['added']:,} unlabelled rows added to {n_labelled:,} labelled "
              f"({transfer['duplicates']:,} duplicates of labelled or earlier rows dropped)", file=sys.stderr)

    # --- teacher: frozen, eval mode, optionally bf16
    teacher = load_model(m.name, m.task, dtype="float32", trust_remote_code=m.trust_remote_code,
                         pad_token_id=t_train.pad_id)
    if labels is not None:
        names = label_names_of(teacher)
        generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        if len(names) != len(labels) or (not generic and names != labels):
            raise RecipeError(f"model.name: the teacher's classes {names} differ from the data's labels {labels}; "
                              f"distil from a teacher fine-tuned on this task")
    if dcfg.attention_weight > 0 and dcfg.intermediate:
        teacher.set_attn_implementation("eager")  # SDPA kernels do not return attention maps

    # --- student
    kept: list[int] | None = None
    if dcfg.student is not None:
        student = load_model(dcfg.student, m.task, label_names=labels, dtype=m.dtype,
                             trust_remote_code=m.trust_remote_code, pad_token_id=s_train.pad_id)
    else:
        student, kept = build_student(teacher, layers=dcfg.student_layers, layer_map=dcfg.student_layer_map,
                                      hidden_size=dcfg.student_hidden_size)
    if dcfg.attention_weight > 0 and dcfg.intermediate:
        student.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    teacher.eval()
    if dcfg.teacher_dtype == "bfloat16":
        teacher.to(torch.bfloat16)
    teacher.to(device)
    student.to(device)

    # --- teacher cache (classifier logits by default; LM logits only when asked: they are big)
    need_teacher = dcfg.alpha < 1.0 or dcfg.intermediate
    use_cache = dcfg.teacher_cache == "on" or (dcfg.teacher_cache == "auto" and not causal)
    use_cache = use_cache and not dcfg.intermediate
    if s_train is not t_train and not use_cache and need_teacher:
        raise RecipeError("distill.teacher_cache: cross-tokenizer distillation needs the teacher cache (on/auto)")
    root = Path(dcfg.cache_dir) if dcfg.cache_dir else cache_dir() / "distill"
    t_hash = hash_files(teacher_path) if Path(teacher_path).is_dir() else hash_state(teacher)
    settings = {"teacher_dtype": dcfg.teacher_dtype, "task": m.task}
    train_cache = None
    if use_cache and need_teacher:
        with distributed.main_first():  # rank 0 fills the cache, the other ranks then read it
            train_cache = teacher_cache(teacher, teacher_path, t_train, root, settings=settings,
                                        batch_size=t.eval_batch_size, teacher_hash=t_hash)
        if distributed.is_main():
            print(f"[slimtune] teacher logits cache {train_cache.status}: {train_cache.path}", file=sys.stderr)
        s_train.example_ids = True  # collate adds example_ids; DistillLoss looks rows up by them

    # --- teacher quality on the eval data (cached for classifiers: computed once per teacher+data)
    result: dict[str, Any] = {"task": m.task, "method": recipe.method_name, "teacher": m.name,
                              "teacher_params": count_params(teacher), "student_layer_map": kept,
                              "alpha": dcfg.alpha, "temperature": dcfg.temperature, "kl_direction": dcfg.kl_direction,
                              "logit_loss": dcfg.logit_loss,
                              "intermediate": dcfg.intermediate,
                              "teacher_cache": train_cache.status if train_cache else "off"}
    if transfer is not None:
        result["transfer_set"] = transfer
    if Path(teacher_path).is_dir():
        result["teacher_size_mb"] = weights_size_mb(teacher_path)
    if t_eval is not None:
        if causal:
            tm = evaluate_any(teacher, t_eval, m.task, labels, t.eval_batch_size)
            result["teacher_perplexity"] = tm["perplexity"]
            result["perplexity_before"] = evaluate_any(student, s_eval, m.task, labels, t.eval_batch_size)["perplexity"]
        else:
            if dcfg.teacher_cache != "off":
                with distributed.main_first():
                    ev_logits = teacher_cache(teacher, teacher_path, t_eval, root, settings=settings,
                                              batch_size=t.eval_batch_size, teacher_hash=t_hash).all()
                tm = classification_metrics(ev_logits.argmax(-1).tolist(), t_eval.labels, labels)
            else:
                tm = evaluate_any(teacher, t_eval, m.task, labels, t.eval_batch_size)
            result.update(teacher_accuracy=tm["accuracy"], teacher_macro_f1=tm["macro_f1"])
    if not need_teacher:
        teacher = None  # the no-KD baseline: free the teacher's memory before training

    # --- the one training loop, with the distillation loss
    total_steps = plan_steps(len(s_train), t)
    method = get_method(recipe.method_name)
    ctx = MethodContext(task=m.task, total_steps=total_steps, base_model=str(dcfg.student or teacher_path))
    student = method.apply(student, recipe.method, ctx)
    hidden_map = layer_map = None
    if dcfg.intermediate:
        n_s, n_t = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
        hidden_map, layer_map = intermediate_maps(n_s, n_t, kept)
        attach_projection(student, int(student.config.hidden_size), int(teacher.config.hidden_size))
    loss_fn = DistillLoss(teacher, dcfg, causal, train_cache, hidden_map, layer_map, unlabeled_rows=transfer is not None)
    metric = t.metric if t.metric != "auto" else ("loss" if causal else "accuracy")
    eval_fn = None
    if s_eval is not None:
        def eval_fn(mdl: Any) -> dict[str, Any]:
            return evaluate_any(mdl, s_eval, m.task, labels, t.eval_batch_size)
    params_trained = count_params(student, trainable_only=True)
    summary = train(student, method, recipe.method, s_train, t, out, total_steps=total_steps,
                    eval_fn=eval_fn, metric=metric, loss_fn=loss_fn, group_by_length=recipe.data.group_by_length)
    if not distributed.is_main():
        return {"rank": distributed.rank(), "train": summary}  # rank 0 exports and evaluates
    detach_projection(student)

    # --- export: plain transformers folder (temp folder, then move into place)
    final = export_model(method, student, recipe.method, ctx, s_tok, out)
    if s_eval is not None:
        result.update(evaluate_any(final, s_eval, m.task, labels, t.eval_batch_size))
        result["eval_file"] = recipe.data.eval or f"{recipe.data.train} (held-out {recipe.data.eval_fraction:.0%})"
        if "teacher_accuracy" in result:
            result["retention"] = result["accuracy"] / max(result["teacher_accuracy"], 1e-12)
    result.update(params=count_params(final), trainable_params=params_trained, size_mb=weights_size_mb(out),
                  student_layers=int(final.config.num_hidden_layers), peak_rss_mb=peak_rss_mb(), train=summary)
    result["compression"] = result["teacher_params"] / max(result["params"], 1)
    update_json(out / "metrics.json", result)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


