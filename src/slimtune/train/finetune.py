"""The fine-tune recipe: data → model → method → the training loop → export → evaluation.

Everything a run writes goes to ``recipe.output``:

- ``config.json`` + ``model.safetensors`` + tokenizer: plain transformers loads it.
- ``adapter/``: PEFT adapter (LoRA-family methods).
- ``metrics.json``: accuracy, macro_f1, per-class report (or perplexity), params, size_mb, timing.
- ``metrics.jsonl`` and ``tensorboard/``: training curves. ``recipe.yaml``: the resolved recipe.

Nothing is written before the recipe, the output folder (:mod:`slimtune.config.outputs`: a
finished run is replaced only with ``overwrite``), the data and the model were checked, and an
unfinished run in the folder is resumed only if its checkpoint's fingerprint
(:mod:`slimtune.train.fingerprint`) is this run's.

Under torchrun (``slimtune finetune --nproc N``) every rank runs this; rank 0 alone writes the
recipe, exports and evaluates; the other ranks return after training (see docs/distributed.md).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from slimtune.config.defaults import provenance_lines
from slimtune.config.outputs import check_output, clear_output
from slimtune.config.recipe import Recipe
from slimtune.data.chat import is_chat_data, prepare_chat_data
from slimtune.data.datasets import (
    ClassificationData,
    DataError,
    TokenizedData,
    load_classification,
    read_text_files,
    split_blocks,
    tokenize_causal,
    tokenize_classification,
)
from slimtune.evaluate.evaluator import evaluate_causal_lm, evaluate_classifier, format_report
from slimtune.evaluate.generation import sft_summary
from slimtune.io import update_json, weights_size_mb
from slimtune.methods import MethodContext, get_method
from slimtune.models.loading import check_exists, count_params, load_model, load_tokenizer, resolve
from slimtune.train import distributed
from slimtune.train.auto import resolve_max_length
from slimtune.train.fingerprint import check_same_run, recipe_fingerprint
from slimtune.train.loop import default_loss, latest_checkpoint, peak_rss_mb, plan_steps, train
from slimtune.train.lr_find import lr_range_test
from slimtune.train.sft_loss import sft_eval_loss, sft_loss


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)


def _read_classification(recipe: Recipe) -> tuple[ClassificationData, ClassificationData | None]:
    """The recipe's labelled train and eval rows (columns, bad rows and labels checked)."""
    d, t = recipe.data, recipe.train
    cols = {"text_column": d.text_column, "text_pair_column": d.text_pair_column,
            "label_column": d.label_column, "skip_bad_rows": d.skip_bad_rows, "encoding": d.encoding}
    tr = load_classification(d.train, max_rows=d.max_train_samples, seed=t.seed, **cols)
    ev = None
    if d.eval:
        ev = load_classification(d.eval, label_names=tr.label_names, max_rows=d.max_eval_samples,
                                 seed=t.seed, **cols)
    return tr, ev


def print_provenance(recipe: Recipe, total_steps: int) -> None:
    """Print every defaulted value with its source (``train.lr = 0.001 (default of method lora)``)."""
    for line in provenance_lines(recipe.provenance):
        print(f"[slimtune] {line}", file=sys.stderr)
    print(f"[slimtune] {total_steps} optimizer steps", file=sys.stderr)


def find_lr_if_auto(recipe: Recipe, model: torch.nn.Module, data: TokenizedData,
                    device: torch.device) -> dict[str, Any] | None:
    """``train.lr: auto``: run the lr range test, set ``train.lr`` (and its provenance); the curve, else None."""
    t = recipe.train
    if t.lr != "auto":
        return None
    curve = lr_range_test(model, data, t, device)
    t.lr = curve["lr"]
    recipe.provenance["train.lr"] = {"value": t.lr, "source": f"auto: lr range test over {curve['steps']} steps, "
                                                              f"{curve['rule']}"}
    if distributed.is_main():
        print(f"[slimtune] train.lr = {t.lr:g} ({recipe.provenance['train.lr']['source']})", file=sys.stderr)
    return curve


def resolve_data_defaults(recipe: Recipe) -> None:
    """Resolve ``data.max_length: auto`` as the run will (tokenizer + data files, no weights):
    what ``--print-config`` shows. Nothing to do without ``data.train``; a model whose tokenizer
    cannot be read (yet) leaves ``auto`` (the run resolves it, or says what is wrong)."""
    if recipe.data.max_length != "auto" or recipe.data.train is None:
        return
    try:
        tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code)
        if recipe.model.task == "classification":
            resolve_max_length(recipe, tokenizer, list(_read_classification(recipe)))
        else:
            resolve_max_length(recipe, tokenizer)
    except (OSError, ValueError, DataError):  # no such model or unreadable data: still printed, with auto
        return


def check_data(recipe: Recipe) -> list[str] | None:
    """Read a classification recipe's data as the run will (no tokenizer, no weights).

    Raises DataError naming the file and line for what the run would reject (a missing column,
    a malformed row, eval labels the training data lacks). ``slimtune validate`` calls it.

    Returns:
        The label names (None for causal-lm data or without ``data.train``).
    """
    if recipe.model.task != "classification" or recipe.data.train is None:
        return None
    return _read_classification(recipe)[0].label_names


def prepare_data(recipe: Recipe, tokenizer: Any) -> tuple[TokenizedData, TokenizedData | None, list[str] | None]:
    """Read and tokenize train/eval data for the recipe's task; return (train, eval, label names)."""
    d, t = recipe.data, recipe.train
    if recipe.model.task == "classification":
        tr, ev = _read_classification(recipe)
        resolve_max_length(recipe, tokenizer, [tr, ev])  # data.max_length: auto -> from these files
        return (tokenize_classification(tr, tokenizer, d.max_length),
                tokenize_classification(ev, tokenizer, d.max_length) if ev else None, tr.label_names)
    resolve_max_length(recipe, tokenizer)  # data.max_length: auto -> the causal-lm default
    if is_chat_data(d.train, d.format, d.encoding):  # chat/instruction JSONL: SFT, loss on the answers only
        return prepare_chat_data(d, tokenizer, t.seed)
    blocks = tokenize_causal(read_text_files(d.train, d.encoding), tokenizer, d.max_length)
    if d.eval:
        ev_blocks = tokenize_causal(read_text_files(d.eval, d.encoding), tokenizer, d.max_length)
    else:
        blocks, ev_blocks = split_blocks(blocks, d.eval_fraction)
    if d.max_train_samples:
        blocks.input_ids = blocks.input_ids[: d.max_train_samples]
    if d.max_eval_samples:
        ev_blocks.input_ids = ev_blocks.input_ids[: d.max_eval_samples]
    return blocks, ev_blocks, None


def evaluate_any(model: torch.nn.Module, data: TokenizedData, task: str, label_names: list[str] | None,
                 batch_size: int) -> dict[str, Any]:
    """Classifier metrics or LM perplexity, by task."""
    if task == "classification":
        return evaluate_classifier(model, data, label_names or [], batch_size)
    if data.token_labels is not None:  # chat SFT: the answer tokens' logits only (no (B, T, vocab) tensor)
        return sft_eval_loss(model, data, max(1, batch_size // 8))
    return evaluate_causal_lm(model, data, max(1, batch_size // 8))


def export_model(method: Any, model: torch.nn.Module, method_cfg: Any, ctx: MethodContext, tokenizer: Any,
                 out: Path) -> torch.nn.Module:
    """Write ``method.export(model, ...)`` and the tokenizer into ``out``; return the exported model.

    Everything is written into ``out/.export-tmp`` first and then moved into place file by
    file (replacing what is there): a crash during export loses nothing already in ``out``.
    """
    tmp = out / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    final = method.export(model, method_cfg, tmp, ctx)
    tokenizer.save_pretrained(tmp)
    for p in tmp.iterdir():
        dest = out / p.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(p, dest)
    tmp.rmdir()
    return final


def guard_output(recipe: Recipe, out: Path, *inputs: str | None) -> str:
    """Before anything loads: the model exists and ``out`` may be written; return the folder's state.

    Raises ModelError for a missing model and RecipeError for a folder that must not be written
    (a finished run without ``overwrite``, files slimtune did not write, one of ``inputs``).
    """
    check_exists(recipe.model.name)
    return check_output(out, overwrite=recipe.overwrite, inputs=(recipe.model.name, *inputs))


def run_fingerprint(recipe: Recipe, out: Path, state: str) -> dict[str, Any]:
    """The run's fingerprint, checked against the folder's newest checkpoint before anything is written.

    Call it once the recipe is final (``data.max_length: auto`` resolved). Raises ResumeError
    naming what changed when the checkpoint would be resumed but comes from another run.
    """
    fp = recipe_fingerprint(recipe.to_dict())
    ckpt = latest_checkpoint(out / "checkpoints")
    if state == "unfinished" and recipe.train.resume and not recipe.overwrite and ckpt is not None:
        check_same_run(ckpt, fp, recipe_only=True)
    return fp


def open_output(recipe: Recipe, out: Path, state: str) -> None:
    """The run writes from here: clear an overwritten folder, create it, save ``recipe.yaml`` (rank 0)."""
    if distributed.is_main():
        if recipe.overwrite and state != "new":
            clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        recipe.save(out / "recipe.yaml")
    else:
        out.mkdir(parents=True, exist_ok=True)


def run_finetune(recipe: Recipe) -> dict[str, Any]:
    """Run a whole fine-tune as the recipe says; return the metrics written to ``metrics.json``."""
    t, m = recipe.train, recipe.model
    out = Path(recipe.output or "outputs/run")
    state = guard_output(recipe, out)
    multi = distributed.init_distributed()  # no-op unless launched by torchrun
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    seed_everything(t.seed)  # the same on every rank: identical initial weights (LoRA init, heads)
    tokenizer = load_tokenizer(m.name, m.trust_remote_code)
    train_data, eval_data, labels = prepare_data(recipe, tokenizer)
    fingerprint = run_fingerprint(recipe, out, state)
    total_steps = plan_steps(len(train_data), t)
    if distributed.is_main():
        print_provenance(recipe, total_steps)
    device = distributed.device() if multi else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # FSDP shards from the CPU copy (each shard goes to its device): the whole model never
    # has to fit one device.
    sharded = multi and t.fsdp
    model = load_model(m.name, m.task, label_names=labels, dtype=m.dtype,
                       trust_remote_code=m.trust_remote_code, pad_token_id=train_data.pad_id).to(
                           "cpu" if sharded else device)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    sft = "chat" in train_data.info  # chat/instruction data (slimtune.data.chat)
    base_config, use_cache = model.config, getattr(model.config, "use_cache", None)
    if sft:  # no KV cache in training; without one, packed blocks get per-example attention
        base_config.use_cache = False
    metric = t.metric if t.metric != "auto" else ("accuracy" if m.task == "classification" else "loss")
    before: dict[str, Any] = {}
    if m.task == "causal-lm" and eval_data is not None and not sharded:
        before = evaluate_any(model, eval_data, m.task, labels, t.eval_batch_size)
        if distributed.is_main():
            print(f"[slimtune] before training: perplexity {before['perplexity']:.3f}", file=sys.stderr)
    method = get_method(recipe.method_name)
    ctx = MethodContext(task=m.task, total_steps=total_steps, base_model=resolve(m.name))
    model = method.apply(model, recipe.method, ctx)
    lr_curve = find_lr_if_auto(recipe, model, train_data, next(model.parameters()).device)
    params, trainable = count_params(model), count_params(model, trainable_only=True)
    eval_fn = None
    if eval_data is not None:
        def eval_fn(mdl: torch.nn.Module) -> dict[str, Any]:
            return evaluate_any(mdl, eval_data, m.task, labels, t.eval_batch_size)
    open_output(recipe, out, state)  # data, model and method are good: the run writes from here
    summary = train(model, method, recipe.method, train_data, t, out, total_steps=total_steps, eval_fn=eval_fn,
                    metric=metric, group_by_length=recipe.data.group_by_length, fingerprint=fingerprint,
                    loss_fn=sft_loss if sft else default_loss)  # SFT: LM-head logits at answer positions only
    if not distributed.is_main():
        return {"rank": distributed.rank(), "train": summary}  # rank 0 exports and evaluates
    if sft:
        base_config.use_cache = use_cache  # exported for generation
    final = export_model(method, model, recipe.method, ctx, tokenizer, out)
    result: dict[str, Any] = {"task": m.task, "method": recipe.method_name, "base_model": m.name}
    if eval_data is not None:
        result.update(evaluate_any(final, eval_data, m.task, labels, t.eval_batch_size))
        result["eval_file"] = recipe.data.eval or f"{recipe.data.train} (held-out {recipe.data.eval_fraction:.0%})"
    if before:
        result["perplexity_before"] = before["perplexity"]
    if sft:
        result.update(sft_summary(final, tokenizer, train_data, eval_data, before, template_mode=recipe.data.chat_template,
                                  batch_size=max(1, t.eval_batch_size // 8),
                                  ppl={k: result[k] for k in ("loss", "perplexity", "tokens")} if eval_data else None))
    result.update(params=params, trainable_params=trainable, plain_params=count_params(final),
                  size_mb=weights_size_mb(out), peak_rss_mb=peak_rss_mb(), train=summary,
                  **({"lr_find": lr_curve} if lr_curve else {}))
    update_json(out / "metrics.json", result)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resumable state is done with
    return result


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of runs: the summary printed at the end of a command."""
    cols = [("run", "run"), ("method", "method"), ("accuracy", "acc"), ("macro_f1", "macro-F1"),
            ("perplexity_before", "ppl before"), ("perplexity", "ppl"),
            ("trainable_params", "trainable"), ("size_mb", "size MB"), ("samples_per_s", "samples/s"),
            ("train_seconds", "train s"), ("peak_rss_mb", "peak RSS MB")]
    present = [(k, h) for k, h in cols if any(_get(r, k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in present) + " |", "|" + "---|" * len(present)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(_get(r, k)) for k, _ in present) + " |")
    return "\n".join(lines)


def _get(r: dict[str, Any], k: str) -> Any:
    return r.get(k, r.get("train", {}).get(k))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_finetune_result(result: dict[str, Any], out: str) -> None:
    """Print the evaluation report and the summary table (the entry point talks, not the library)."""
    if "per_class" in result or "perplexity" in result:
        print(format_report(result, title=f"evaluation on {result.get('eval_file')}"))
    print()
    print(results_table([{"run": out, **result}]))
