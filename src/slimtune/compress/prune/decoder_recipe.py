"""``slimtune prune`` of a causal LM: a smaller causal LM of the same class, never a classifier.

Steps, each optional, in this order (every one measured on the task's own text):

1. vocabulary (``--vocab``, ``--vocab-from``, ``--vocab-top``; :mod:`~slimtune.compress.prune.decoder_vocab`):
   byte-level BPE kept to the task's tokens, exact on the task text; the tokenization of the
   training data is re-checked with the pruned tokenizer (``vocab.identical_examples``);
2. depth (``--layers N`` / ``--keep-layers K``; :mod:`~slimtune.compress.prune.decoder_depth`):
   whole layers of lowest block influence (ShortGPT), per-layer scores in ``metrics.json``;
3. width (``--ffn F``, ``--heads H``; :mod:`~slimtune.compress.prune.decoder_width`): FFN
   neurons and whole KV groups, ranked on the depth-pruned model;
4. recovery (``--recover-steps N``): the one training loop, on the task loss (answer tokens of
   chat data, as SFT trains) plus, with ``--kd``, causal logit KD from the unpruned model
   (:mod:`~slimtune.compress.prune.decoder_kd`).

The output folder is a plain ``LlamaForCausalLM`` (or Mistral/Qwen2) folder: ``config.json``,
``model.safetensors``, ``generation_config.json``, the tokenizer (with its chat template),
``metrics.json`` (perplexity, exact match / accuracy on a chat ``--eval``, params, size, what was
pruned and why), ``prune.yaml`` / ``prune.json`` (the settings) and, after recovery,
``recipe.yaml``. It is written in one atomic step after every setting was validated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtune.compress.prune.decoder_arch import DecoderPruneError
from slimtune.compress.prune.decoder_calib import calibration_batches
from slimtune.compress.prune.decoder_data import is_chat, read_examples, task_token_ids
from slimtune.compress.prune.decoder_depth import prune_depth
from slimtune.compress.prune.decoder_kd import decoder_kd_loss_fn, task_loss
from slimtune.compress.prune.decoder_vocab import prune_decoder_vocab
from slimtune.compress.prune.decoder_width import prune_width
from slimtune.compress.prune.settings import (
    DECODER_RECOVERY_LR,
    SETTINGS_FILE,
    PruneSettings,
    check_decoder_plan,
)
from slimtune.config.fields import save_settings
from slimtune.config.recipe import DataConfig, ModelConfig, Recipe, TrainConfig
from slimtune.evaluate.generation import evaluate_chat
from slimtune.evaluate.metrics import evaluate_causal_lm
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.methods import MethodContext, get_method
from slimtune.models.loading import count_params, load_model, load_tokenizer, resolve
from slimtune.train.finetune import seed_everything
from slimtune.train.loop import train


@dataclass
class _State:
    """What the decoder pruning steps hand on."""

    model: Any
    tokenizer: Any
    teacher: Any
    result: dict[str, Any]
    new_to_old: torch.Tensor | None = None
    train_data: Any = None
    tokenizer_dir: Path | None = None
    old_tokenizer: Any = None  # the unpruned tokenizer, for the exactness check of vocabulary pruning


def architecture_of(model: torch.nn.Module) -> dict[str, Any]:
    """The shape of a decoder, for metrics.json."""
    c = model.config
    return {"class": type(model).__name__, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "intermediate": c.intermediate_size, "vocab": c.vocab_size,
            "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False))}


def prune_decoder_to_dir(s: PruneSettings, say: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Prune the causal LM ``s.model`` as ``s`` says; write ``s.output``; return ``(model, tokenizer, metrics)``.

    ``s`` was validated; an alias is checked here once resolved, before any weight is read.
    """
    path = resolve(s.model)
    check_decoder_plan(s, json.loads((Path(path) / "config.json").read_text(encoding="utf-8")))
    if s.num_threads:
        torch.set_num_threads(s.num_threads)
    seed_everything(s.seed)
    out = Path(s.output)
    t_start = time.perf_counter()
    with atomic_dir(out) as tmp:
        st = _setup(s)
        _step_vocab(s, st, tmp, say)
        if s.train:
            st.train_data = read_examples(s.train, st.tokenizer, s.max_length, max_rows=s.max_train_samples,
                                          seed=s.seed)
        _check_vocab_exact(s, st)
        _step_depth_and_width(s, st, say)
        summary = _step_recover(s, st, tmp, say)
        _step_save(s, st, tmp)
        _step_evaluate(s, st)
        r = st.result
        r.update(architecture=architecture_of(st.model), params=count_params(st.model),
                 size_mb=weights_size_mb(tmp), train=summary, seconds=time.perf_counter() - t_start)
        r["params_ratio"] = r["params_before"] / r["params"]
        atomic_write_json(tmp / "metrics.json", r)
        saved = dataclasses.replace(s, overwrite=False)  # a repeat from prune.yaml asks again before replacing
        atomic_write_json(tmp / "prune.json", dataclasses.asdict(saved))
        save_settings(saved, tmp / SETTINGS_FILE)
    return st.model, st.tokenizer, st.result


def _setup(s: PruneSettings) -> _State:
    """Load the tokenizer and the causal LM (and a frozen copy as the KD teacher)."""
    tokenizer = load_tokenizer(s.model)
    model = load_model(s.model, "causal-lm")
    result: dict[str, Any] = {"task": "causal-lm", "method": "prune", "base_model": s.model,
                              "params_before": count_params(model), "architecture_before": architecture_of(model)}
    teacher = copy.deepcopy(model).eval() if s.kd else None
    return _State(model, tokenizer, teacher, result)


def _step_vocab(s: PruneSettings, st: _State, tmp: Path, say: Any) -> None:
    """Keep the task's tokens (+ specials, bytes, merge ancestors, the first ``vocab_top``)."""
    files = s.decoder_vocab_files()
    if not files:
        return
    used = task_token_ids(files, st.tokenizer)
    used |= set(range(min(s.vocab_top, len(st.tokenizer))))
    st.old_tokenizer = st.tokenizer
    st.tokenizer_dir = tmp / ".tokenizer-tmp"
    st.tokenizer, st.new_to_old, info = prune_decoder_vocab(st.model, st.tokenizer, used, st.tokenizer_dir)
    info.update(files=files, vocab_top=s.vocab_top)
    st.result["vocab"] = info
    say(f"vocabulary {info['vocab_size_before']:,} -> {info['vocab_size_after']:,} tokens "
        f"(merges {info['merges_before']:,} -> {info['merges_after']:,})")


def _check_vocab_exact(s: PruneSettings, st: _State) -> None:
    """Tokenize the training data with the unpruned tokenizer too: the ids must map one to one."""
    if st.old_tokenizer is None or st.train_data is None:
        return
    old = read_examples(s.train, st.old_tokenizer, s.max_length, max_rows=s.max_train_samples, seed=s.seed)
    old_to_new = {int(o): n for n, o in enumerate(st.new_to_old.tolist())}
    same = sum([old_to_new.get(i, -1) for i in a] == b for a, b in zip(old.input_ids, st.train_data.input_ids, strict=True))
    st.result["vocab"].update(identical_examples=same, checked_examples=len(old.input_ids))
    if same != len(old.input_ids):
        raise DecoderPruneError(f"vocabulary pruning changed the tokenization of {len(old.input_ids) - same} training "
                           f"examples of {s.train}; this is a bug in slimtune (please report it)")


def _step_depth_and_width(s: PruneSettings, st: _State, say: Any) -> None:
    n_layers = int(st.model.config.num_hidden_layers)
    n_drop = s.layers_to_remove(n_layers)
    if not (n_drop or s.ffn or s.heads):
        return
    importance = "activation" if s.importance == "auto" else s.importance
    batches = (calibration_batches(st.train_data, s.importance_batches, s.batch(True), s.seed)
               if st.train_data is not None else [])
    if n_drop:
        st.model, st.result["depth"] = prune_depth(st.model, batches, n_drop)
        say(f"layers {n_layers} -> {n_layers - n_drop} (dropped {st.result['depth']['dropped_layers']}, "
            f"lowest block influence)")
    if s.ffn or s.heads:
        st.model, st.result["width"] = prune_width(st.model, batches, ffn=s.ffn, heads=s.heads, importance=importance)
        w = st.result["width"]
        say(f"FFN {w['intermediate_before']} -> {w['intermediate_after']}, heads {w['heads_before']} -> "
            f"{w['heads_after']} (KV {w['kv_heads_before']} -> {w['kv_heads_after']}) per layer, by {importance}")


def _step_recover(s: PruneSettings, st: _State, tmp: Path, say: Any) -> dict[str, Any] | None:
    """Recovery training of every weight: task loss (+ causal KD from the unpruned model)."""
    teacher, st.teacher = st.teacher, None
    if s.recover_steps == 0:
        return None
    method = get_method("full")
    mcfg = method.config_cls()
    lr = s.lr if s.lr is not None else DECODER_RECOVERY_LR
    say(f"recovery: {s.recover_steps} steps at lr {lr:g} ({'user' if s.lr is not None else 'default of decoder recovery'})"
        f"{f', KD from the unpruned model on {s.kd_positions} positions' if teacher is not None else ''}")
    tcfg = TrainConfig(max_steps=s.recover_steps, batch_size=s.batch(True), lr=lr, warmup_ratio=0.06, seed=s.seed,
                       tensorboard=False, resume=False, log_every=10)
    ctx = MethodContext(task="causal-lm", total_steps=s.recover_steps, base_model=s.model)
    st.model = method.apply(st.model, mcfg, ctx)
    loss_fn = (decoder_kd_loss_fn(teacher, st.new_to_old, temperature=s.kd_temperature, alpha=s.kd_alpha,
                                  positions=s.kd_positions) if teacher is not None else task_loss)
    use_cache = st.model.config.use_cache
    st.model.config.use_cache = False
    try:  # no eval_fn: the final weights are used, never ones picked on the evaluation file
        summary = train(st.model, method, mcfg, st.train_data, tcfg, tmp, total_steps=s.recover_steps, loss_fn=loss_fn)
    finally:
        st.model.config.use_cache = use_cache
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    recipe = Recipe(output=s.output, model=ModelConfig(name=s.model, task="causal-lm"),
                    data=DataConfig(train=s.train, eval=s.eval, max_length=s.max_length,
                                    max_train_samples=s.max_train_samples),
                    train=tcfg, method=mcfg, method_name=method.name)
    recipe.save(tmp / "recipe.yaml")  # the recovery run's settings (evaluate reads data.max_length from it)
    return summary


def _step_save(s: PruneSettings, st: _State, tmp: Path) -> None:
    """config.json + model.safetensors + generation_config.json, and the tokenizer (the pruned tokenizer.json as written)."""
    st.model.eval()
    st.model.save_pretrained(tmp)
    st.tokenizer.save_pretrained(tmp)
    if st.tokenizer_dir is not None:
        shutil.copyfile(st.tokenizer_dir / "tokenizer.json", tmp / "tokenizer.json")
        shutil.rmtree(st.tokenizer_dir, ignore_errors=True)


def _step_evaluate(s: PruneSettings, st: _State) -> None:
    """Perplexity on --eval; on chat data also answer perplexity, exact match and label accuracy."""
    if not s.eval:
        return
    data = read_examples(s.eval, st.tokenizer, s.max_length, max_rows=s.max_eval_samples, seed=s.seed, for_eval=True)
    batch = max(1, s.batch(True) // 2)
    if is_chat(s.eval):
        st.result.update(evaluate_chat(st.model, st.tokenizer, data, batch_size=batch, samples=3))
    else:
        st.result.update(evaluate_causal_lm(st.model, data, batch))
    st.result["eval_file"] = s.eval
