"""Knowledge distillation: a smaller student learns from a frozen teacher, in the one training loop.

Distillation is fine-tuning with another loss: ``run_distill`` builds the student (kept teacher
layers, a narrower fresh model, or a given folder), freezes the teacher, and calls
:func:`slimtune.train.loop.train` with a :class:`DistillLoss`. Pieces live one concept per file:

- ``compress/distill/student.py``: student construction (layer map, narrow init);
- ``compress/distill/losses.py``: logit KD (forward/reverse KL, T²), hidden-state MSE, attention KL;
- ``compress/distill/cache.py``: teacher logits cached on disk (safetensors), keyed by content hashes.

The recipe is the fine-tune recipe (``model.name`` is the *teacher*) plus a ``distill`` section
(:class:`DistillConfig`); both are saved as ``recipe.yaml`` beside the student.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from slimtune.compress.distill.cache import hash_files, hash_state, teacher_cache
from slimtune.compress.distill.losses import (
    attention_kl,
    causal_kd_mask,
    hidden_mse,
    kd_loss,
    uniform_hidden_map,
)
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.distill.student import build_student, check_student_spec
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
from slimtune.train.finetune import (
    evaluate_any,
    export_model,
    guard_output,
    open_output,
    prepare_data,
    print_provenance,
    run_fingerprint,
    seed_everything,
)
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


def _config_label_names(config: Any) -> list[str]:
    id2label = {int(k): v for k, v in config.id2label.items()}
    return [id2label[i] for i in range(len(id2label))]


def check_teacher_classes(names: list[str], labels: list[str] | None) -> None:
    """The teacher (class ``names`` from its config) must have been fine-tuned on the data's labels."""
    if labels is None:
        return
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if len(names) != len(labels) or (not generic and names != labels):
        raise RecipeError(f"model.name: the teacher's classes {names} differ from the data's labels {labels}; "
                          f"distil from a teacher fine-tuned on this task")


def teacher_cache_policy(dcfg: DistillConfig, causal: bool, same_vocab: bool) -> tuple[bool, bool]:
    """(needs the teacher, uses the logit cache); refuses what cross-tokenizer KD cannot do.

    A student with another vocabulary sees other token ids: only classifier logits, looked up
    in the teacher's cache by example, carry over.
    """
    need_teacher = dcfg.alpha < 1.0 or dcfg.intermediate
    use_cache = dcfg.teacher_cache == "on" or (dcfg.teacher_cache == "auto" and not causal)
    use_cache = use_cache and not dcfg.intermediate
    if not same_vocab:
        if causal or dcfg.intermediate:
            raise RecipeError("distill.student: its tokenizer differs from the teacher's; cross-tokenizer "
                              "distillation works only for classifier logits without intermediate KD")
        if not use_cache and need_teacher:
            raise RecipeError("distill.teacher_cache: cross-tokenizer distillation needs the teacher cache (on/auto)")
    return need_teacher, use_cache


def check_distill_inputs(recipe: Any, dcfg: DistillConfig, labels: list[str] | None) -> None:
    """What :func:`run_distill` checks once weights are loaded, from configs and tokenizers only.

    The teacher's classes against the data's ``labels``, the student's layers (count, map,
    width) against the teacher's config, and a student tokenizer other than the teacher's.
    ``slimtune validate`` calls it, so a recipe it accepts does not fail after loading.
    """
    m = recipe.model
    tc = AutoConfig.from_pretrained(resolve(m.name), trust_remote_code=m.trust_remote_code)
    if m.task == "classification":
        check_teacher_classes(_config_label_names(tc), labels)
    if dcfg.student is None:
        check_student_spec(tc, layers=dcfg.student_layers, layer_map=dcfg.student_layer_map,
                           hidden_size=dcfg.student_hidden_size)
        return
    same = _same_vocab(load_tokenizer(dcfg.student, m.trust_remote_code), load_tokenizer(m.name, m.trust_remote_code))
    teacher_cache_policy(dcfg, m.task == "causal-lm", same)


@dataclass
class _Distill:
    """What the steps of one :func:`run_distill` share."""

    recipe: Any
    dcfg: DistillConfig
    out: Path
    device: Any
    teacher_path: str
    causal: bool
    t_tok: Any = None
    t_train: Any = None
    t_eval: Any = None
    labels: list[str] | None = None
    s_tok: Any = None
    s_train: Any = None
    s_eval: Any = None
    transfer: dict[str, int] | None = None
    teacher: Any = None
    student: Any = None
    kept: list[int] | None = None
    cache: Any = None  # the teacher-logit cache of the training data (None: live teacher)
    out_state: str = "new"  # slimtune.config.outputs.output_state of ``out`` when the run started
    fingerprint: dict[str, Any] | None = None  # slimtune.train.fingerprint: saved in every checkpoint


def run_distill(recipe: Any, dcfg: DistillConfig | None = None) -> dict[str, Any]:
    """Distil ``recipe.model.name`` (the teacher) into a student; write it and ``metrics.json``.

    ``dcfg`` defaults to the recipe's ``distill`` section. The recipe, with ``dcfg`` as its
    ``distill`` section, is saved as ``recipe.yaml``: ``slimtune distill --config`` repeats the run.
    Data, teacher and student are loaded and checked before anything is written.

    Returns the metrics: student accuracy/macro-F1 (or perplexity), teacher's, retention,
    parameter counts and sizes, the layer map, the cache status and the training summary.
    """
    if dcfg is None:
        if recipe.distill is None:
            raise RecipeError("distill: the recipe has no distill section (say how to build the student)")
        dcfg = recipe.distill
    t, m = recipe.train, recipe.model
    out = Path(recipe.output or "outputs/distill")
    state = guard_output(recipe, out, dcfg.student)  # before anything loads or is written
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    seed_everything(t.seed)
    distributed.init_distributed()  # under torchrun: join the group, pick this rank's GPU
    run = _Distill(recipe=recipe, dcfg=dcfg, out=out, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                   teacher_path=resolve(m.name), causal=m.task == "causal-lm", out_state=state)
    _setup_data(run)
    run.fingerprint = run_fingerprint(dataclasses.replace(recipe, distill=dcfg), out, state)
    _setup_teacher(run)
    _setup_student(run)
    need_teacher, use_cache = teacher_cache_policy(dcfg, run.causal, run.s_train is run.t_train)
    result = _setup_cache_and_teacher_quality(run, need_teacher, use_cache)
    if not need_teacher:
        run.teacher = None  # the no-KD baseline: free the teacher's memory before training
    return _train_and_export(run, result)


def _setup_data(run: _Distill) -> None:
    """The teacher's tokenization of the data, the student's if its vocabulary differs, the transfer set."""
    recipe, dcfg, m = run.recipe, run.dcfg, run.recipe.model
    run.t_tok = load_tokenizer(m.name, m.trust_remote_code)
    run.t_train, run.t_eval, run.labels = prepare_data(recipe, run.t_tok)
    run.s_tok, run.s_train, run.s_eval = run.t_tok, run.t_train, run.t_eval
    if dcfg.student is not None:
        s_tok = load_tokenizer(dcfg.student, m.trust_remote_code)
        if not _same_vocab(s_tok, run.t_tok):
            teacher_cache_policy(dcfg, run.causal, same_vocab=False)  # refuses what cannot work, early
            run.s_tok = s_tok
            run.s_train, run.s_eval, _ = prepare_data(recipe, s_tok)
    if dcfg.unlabeled:
        n_labelled = len(run.t_train)
        distinct = [(run.t_train, run.t_tok)] + ([(run.s_train, run.s_tok)] if run.s_train is not run.t_train else [])
        run.transfer = add_transfer_set(recipe, dcfg, distinct)
        print(f"[slimtune] transfer set: {run.transfer['added']:,} unlabelled rows added to {n_labelled:,} labelled "
              f"({run.transfer['duplicates']:,} duplicates of labelled or earlier rows dropped)", file=sys.stderr)


def _setup_teacher(run: _Distill) -> None:
    """Load the teacher (float32 for now) and check its classes against the data's labels."""
    m = run.recipe.model
    run.teacher = load_model(m.name, m.task, dtype="float32", trust_remote_code=m.trust_remote_code,
                             pad_token_id=run.t_train.pad_id)
    if run.labels is not None:
        check_teacher_classes(label_names_of(run.teacher), run.labels)
    if run.dcfg.attention_weight > 0 and run.dcfg.intermediate:
        run.teacher.set_attn_implementation("eager")  # SDPA kernels do not return attention maps


def _setup_student(run: _Distill) -> None:
    """Load or build the student; freeze the teacher (eval mode, optionally bf16); place both."""
    dcfg, m, teacher = run.dcfg, run.recipe.model, run.teacher
    if dcfg.student is not None:
        run.student = load_model(dcfg.student, m.task, label_names=run.labels, dtype=m.dtype,
                                 trust_remote_code=m.trust_remote_code, pad_token_id=run.s_train.pad_id)
    else:
        run.student, run.kept = build_student(teacher, layers=dcfg.student_layers, layer_map=dcfg.student_layer_map,
                                              hidden_size=dcfg.student_hidden_size)
    if dcfg.attention_weight > 0 and dcfg.intermediate:
        run.student.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    teacher.eval()
    if dcfg.teacher_dtype == "bfloat16":
        teacher.to(torch.bfloat16)
    teacher.to(run.device)
    run.student.to(run.device)


def _setup_cache_and_teacher_quality(run: _Distill, need_teacher: bool, use_cache: bool) -> dict[str, Any]:
    """Fill or read the teacher-logit cache; the teacher's quality on the eval data; the result so far.

    Classifier logits are cached by default, LM logits only when asked (they are big); the
    eval logits are cached too, so the teacher's accuracy is computed once per teacher + data.
    """
    dcfg, m, t, teacher = run.dcfg, run.recipe.model, run.recipe.train, run.teacher
    root = Path(dcfg.cache_dir) if dcfg.cache_dir else cache_dir() / "distill"
    t_hash = hash_files(run.teacher_path) if Path(run.teacher_path).is_dir() else hash_state(teacher)
    settings = {"teacher_dtype": dcfg.teacher_dtype, "task": m.task}
    if use_cache and need_teacher:
        with distributed.main_first():  # rank 0 fills the cache, the other ranks then read it
            run.cache = teacher_cache(teacher, run.teacher_path, run.t_train, root, settings=settings,
                                      batch_size=t.eval_batch_size, teacher_hash=t_hash)
        if distributed.is_main():
            print(f"[slimtune] teacher logits cache {run.cache.status}: {run.cache.path}", file=sys.stderr)
        run.s_train.example_ids = True  # collate adds example_ids; DistillLoss looks rows up by them
    result: dict[str, Any] = {"task": m.task, "method": run.recipe.method_name, "teacher": m.name,
                              "teacher_params": count_params(teacher), "student_layer_map": run.kept,
                              "alpha": dcfg.alpha, "temperature": dcfg.temperature, "kl_direction": dcfg.kl_direction,
                              "logit_loss": dcfg.logit_loss,
                              "intermediate": dcfg.intermediate,
                              "teacher_cache": run.cache.status if run.cache else "off"}
    if run.transfer is not None:
        result["transfer_set"] = run.transfer
    if Path(run.teacher_path).is_dir():
        result["teacher_size_mb"] = weights_size_mb(run.teacher_path)
    if run.t_eval is None:
        return result
    if run.causal:
        tm = evaluate_any(teacher, run.t_eval, m.task, run.labels, t.eval_batch_size)
        result["teacher_perplexity"] = tm["perplexity"]
        result["perplexity_before"] = evaluate_any(run.student, run.s_eval, m.task, run.labels,
                                                   t.eval_batch_size)["perplexity"]
        return result
    if dcfg.teacher_cache != "off":
        with distributed.main_first():
            ev_logits = teacher_cache(teacher, run.teacher_path, run.t_eval, root, settings=settings,
                                      batch_size=t.eval_batch_size, teacher_hash=t_hash).all()
        tm = classification_metrics(ev_logits.argmax(-1).tolist(), run.t_eval.labels, run.labels)
    else:
        tm = evaluate_any(teacher, run.t_eval, m.task, run.labels, t.eval_batch_size)
    result.update(teacher_accuracy=tm["accuracy"], teacher_macro_f1=tm["macro_f1"])
    return result


def _train_and_export(run: _Distill, result: dict[str, Any]) -> dict[str, Any]:
    """The one training loop with the distillation loss, then export and evaluate (rank 0)."""
    recipe, dcfg, t, m = run.recipe, run.dcfg, run.recipe.train, run.recipe.model
    total_steps = plan_steps(len(run.s_train), t)
    if distributed.is_main():
        print_provenance(recipe, total_steps)  # lr, epochs, max_length: the values and their sources
    method = get_method(recipe.method_name)
    ctx = MethodContext(task=m.task, total_steps=total_steps, base_model=str(dcfg.student or run.teacher_path))
    student = method.apply(run.student, recipe.method, ctx)
    hidden_map = layer_map = None
    if dcfg.intermediate:
        n_s, n_t = int(student.config.num_hidden_layers), int(run.teacher.config.num_hidden_layers)
        hidden_map, layer_map = intermediate_maps(n_s, n_t, run.kept)
        attach_projection(student, int(student.config.hidden_size), int(run.teacher.config.hidden_size))
    loss_fn = DistillLoss(run.teacher, dcfg, run.causal, run.cache, hidden_map, layer_map,
                          unlabeled_rows=run.transfer is not None)
    metric = t.metric if t.metric != "auto" else ("loss" if run.causal else "accuracy")
    s_eval, labels = run.s_eval, run.labels
    eval_fn = None
    if s_eval is not None:
        def eval_fn(mdl: Any) -> dict[str, Any]:
            return evaluate_any(mdl, s_eval, m.task, labels, t.eval_batch_size)
    params_trained = count_params(student, trainable_only=True)
    open_output(dataclasses.replace(recipe, distill=dcfg), run.out, run.out_state)  # all checked: writes from here
    summary = train(student, method, recipe.method, run.s_train, t, run.out, total_steps=total_steps,
                    eval_fn=eval_fn, metric=metric, loss_fn=loss_fn, group_by_length=recipe.data.group_by_length,
                    fingerprint=run.fingerprint)
    if not distributed.is_main():
        return {"rank": distributed.rank(), "train": summary}  # rank 0 exports and evaluates
    detach_projection(student)
    # export: a plain transformers folder (temp folder, then moved into place)
    final = export_model(method, student, recipe.method, ctx, run.s_tok, run.out)
    if s_eval is not None:
        result.update(evaluate_any(final, s_eval, m.task, labels, t.eval_batch_size))
        result["eval_file"] = recipe.data.eval or f"{recipe.data.train} (held-out {recipe.data.eval_fraction:.0%})"
        if "teacher_accuracy" in result:
            result["retention"] = result["accuracy"] / max(result["teacher_accuracy"], 1e-12)
    result.update(params=count_params(final), trainable_params=params_trained, size_mb=weights_size_mb(run.out),
                  student_layers=int(final.config.num_hidden_layers), peak_rss_mb=peak_rss_mb(), train=summary)
    result["compression"] = result["teacher_params"] / max(result["params"], 1)
    update_json(run.out / "metrics.json", result)
    shutil.rmtree(run.out / "checkpoints", ignore_errors=True)
    return result
