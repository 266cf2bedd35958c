"""``slimtune run recipe.yaml``: one recipe runs the whole chain, every stage kept, reruns resume.

Stages, in this order (any subset): ``finetune → distill → prune → quantize → evaluate →
bench → report``. Each model stage reads the previous model stage's folder and writes its own,
``OUT/01-finetune/``, ``OUT/02-distill/``, ... every one of them kept. ``evaluate``, ``bench``
and ``report`` look at all model folders of the run (plus the input model when there is no
fine-tune stage, as the reference).

The recipe is the fine-tune recipe (``output``, ``model``, ``data``, ``train``, ``method``,
shared by every stage) plus one section per stage (its settings, validated against a
dataclass; unknown keys are rejected naming the key) and an optional ``stages`` list. Without
``stages`` the stages are those with a section, in the order above. The WHOLE recipe is
validated before any weight loads.

Causal LMs (``model.task: causal-lm``, given or inferred from chat/instruction JSONL or text data;
or, with no finetune stage, a causal-LM input model) run :data:`DECODER_STAGES`: ``finetune`` (any
method; SFT on chat data, raw LM on text) → ``prune`` (the decoder path of ``slimtune prune``:
vocabulary, depth, width, KD recovery; still a causal LM) → ``quantize`` (``slimtune quantize``
for a decoder: the fastest int8/int4 kernel within its perplexity gate, llama.cpp GGUF or torch)
→ ``evaluate`` (``slimtune evaluate``'s figures: answer perplexity, exact match, label accuracy and
samples on a chat file; perplexity on text) → ``bench`` (:mod:`slimtune.benchmark.generation`:
prompt/prefill latency and decoding ms per token, GGUF folders through llama.cpp) → ``report``.
``distill`` cannot take a decoder yet and is refused at validation, naming it: the task is never
silently changed.

The ``evaluate`` and ``bench`` sections ARE the settings of ``slimtune evaluate`` /
``slimtune bench`` (:class:`~slimtune.evaluate.evaluator.EvaluateSettings`,
:class:`~slimtune.benchmark.settings.BenchSettings`: same keys, help and ranges); the fields the
pipeline fills itself (``model``, ``output``) are refused in a recipe. ``OUT/pipeline.yaml`` is
the recipe as run (:func:`resolved_tree`), readable again by ``slimtune run``.

Re-running skips a stage whose config and inputs are unchanged: ``stage.json`` in its folder
stores a hash of the stage's resolved config and a fingerprint (name, size, mtime) of its
input folders' weight/config/tokenizer files and data files. A changed stage reruns, and so do
the stages after it (their input changed). A stage that was interrupted reruns in place, so
training resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtune.benchmark.generation import bench_decoders
from slimtune.benchmark.latency import bench_models, format_bench, latency_at
from slimtune.benchmark.settings import BenchSettings
from slimtune.benchmark.timing import hardware_fingerprint
from slimtune.compress.distill.recipe import run_distill
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.inputs import is_causal_lm_folder
from slimtune.compress.prune.recipe import PruneSettings, run_prune
from slimtune.compress.quant.recipe import QuantizeSettings, run_quantize
from slimtune.config.fields import check_ranges, default_of, setting
from slimtune.config.recipe import (
    RecipeError,
    build_section,
    deep_merge,
    load_yaml,
    parse_override,
    resolve,
    set_path,
)
from slimtune.data.chat import is_chat_data
from slimtune.data.packaged import expand_tree
from slimtune.evaluate.evaluator import (
    EvaluateSettings,
    evaluate_model_dir,
    run_evaluate,
)
from slimtune.io import atomic_write_json, atomic_write_text, weights_size_mb
from slimtune.models.loading import check_exists
from slimtune.models.loading import resolve as resolve_model
from slimtune.report.html import write_report
from slimtune.report.settings import ReportSettings
from slimtune.runtime.folders import count_stored_params, model_kind
from slimtune.train.finetune import run_finetune

ORDER = ("finetune", "distill", "prune", "quantize", "evaluate", "bench", "report")
MODEL_STAGES = ("finetune", "distill", "prune", "quantize")
SHARED_KEYS = ("output", "model", "data", "train", "method")  # the fine-tune recipe, shared by every stage
DECODER_STAGES = ("finetune", "prune", "quantize", "evaluate", "bench", "report")  # what a causal LM runs through


# --------------------------------------------------------------------------------------------
# Stage sections
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneStage:
    """``finetune:``: fine-tune ``model.name`` on ``data`` (overrides of the shared sections)."""

    train: dict = setting({}, "Overrides of the shared train section for this stage, e.g. {epochs: 2}.")
    method: dict = setting({}, "Overrides of the shared method section, e.g. {name: lora, r: 8}.")


# The prune/quantize sections ARE the commands' settings (same keys, help and ranges as the flags of
# `slimtune prune` / `slimtune quantize`); model/output are filled by the pipeline, and the shared
# data paths, lengths and seed where the section leaves them unset (see _prune_settings).
PruneStage = PruneSettings
QuantizeStage = QuantizeSettings


STAGE_CLASSES: dict[str, type] = {"finetune": FinetuneStage, "prune": PruneStage, "quantize": QuantizeStage,
                                  "evaluate": EvaluateSettings, "bench": BenchSettings, "report": ReportSettings}


@dataclass
class Plan:
    """A validated pipeline: shared tree, stage configs, output folder."""

    tree: dict[str, Any]  # output/model/data/train/method: the fine-tune recipe sections
    stages: list[str]
    configs: dict[str, Any]  # stage -> its dataclass (distill: (train overrides, DistillConfig))
    output: Path
    source: str
    task: str = "classification"  # causal-lm: the decoder chain (finetune → evaluate → bench → report)

    def stage_dir(self, name: str) -> Path:
        return self.output / f"{self.stages.index(name) + 1:02d}-{name}"


# --------------------------------------------------------------------------------------------
# Validation (no weights loaded)
# --------------------------------------------------------------------------------------------


def load_plan(path: str, overrides: list[str] | None = None) -> Plan:
    """Read, override and validate a pipeline recipe completely; raise RecipeError naming the key."""

    tree = load_yaml(path)
    for ov in overrides or []:
        p, v = parse_override(ov)
        set_path(tree, p, v)
    return validate_tree(tree, path)


def validate_tree(tree: dict[str, Any], source: str = "recipe") -> Plan:
    """Validate a pipeline tree (see :func:`load_plan`)."""

    tree = expand_tree(dict(tree))  # packaged:NAME/SPLIT paths -> real files, for every stage and pipeline.yaml
    stages, sections = _stage_list(tree, source)
    if not tree.get("output"):
        raise RecipeError(f"{source}: 'output' (the pipeline's folder) is required")
    base = {k: tree[k] for k in SHARED_KEYS if k in tree}
    recipe = resolve(base, source)  # model/data/train/method: strict, files checked
    task = pipeline_task(recipe, stages)
    if task == "causal-lm":
        check_decoder_stages(recipe, stages)
    if recipe.data.train is None and any(s in stages for s in ("finetune", "distill")):
        raise RecipeError("data.train: required by the finetune/distill stages")
    configs: dict[str, Any] = {}
    for s in stages:
        sec = sections[s]
        if not isinstance(sec, dict):
            raise RecipeError(f"{s}: expected a mapping of keys, got {sec!r}")
        if s == "distill":

            sec = dict(sec)
            train_ov = sec.pop("train", None) or {}
            dcfg = build_section(DistillConfig, sec, "distill")
            dcfg.validate(resolve(deep_merge(base, {"train": train_ov}), f"{source} (distill)"))
            configs[s] = {"train": train_ov, "distill": dcfg}
            continue
        cfg = build_section(STAGE_CLASSES[s], sec, s)
        if s == "finetune":
            resolve(deep_merge(base, {"train": cfg.train, "method": cfg.method}), f"{source} (finetune)")
        elif s == "prune":
            cfg = _prune_settings(cfg, recipe, sec, task)
        elif s == "quantize":
            cfg = _quantize_settings(cfg, recipe, sec, task)
        else:  # evaluate, bench, report: the commands' own settings
            _check_stage_settings(cfg, s, recipe)
            if task == "causal-lm":
                check_decoder_settings(cfg, s, recipe)
        configs[s] = cfg
    if "finetune" not in stages and any(s in stages for s in MODEL_STAGES):

        check_exists(recipe.model.name)
    return Plan(tree=base, stages=list(stages), configs=configs, output=Path(recipe.output), source=source, task=task)


def pipeline_task(recipe: Any, stages: list[str]) -> str:
    """``causal-lm`` when the run's model is a decoder: ``model.task`` is causal-lm (given, or inferred
    from chat/instruction or text data), or, with no finetune stage, the input model is a causal LM."""
    if recipe.model.task == "causal-lm":
        return "causal-lm"
    if "finetune" in stages:
        return recipe.model.task
    name = recipe.model.name
    if is_causal_lm_folder(name):
        return "causal-lm"
    return recipe.model.task


def check_decoder_stages(recipe: Any, stages: list[str]) -> None:
    """A decoder runs :data:`DECODER_STAGES` only: refuse the others by name (never a silent change of task)."""
    refused = [s for s in stages if s not in DECODER_STAGES]
    if refused:
        raise RecipeError(f"stages: {', '.join(refused)} cannot take a causal LM yet ({recipe.model.name} runs as "
                          f"causal-lm); a decoder runs {' → '.join(DECODER_STAGES)}: remove "
                          f"{'it' if len(refused) == 1 else 'them'} from the recipe")


def check_decoder_settings(cfg: Any, section: str, recipe: Any) -> None:
    """The evaluate/bench sections of a decoder run: no classifier-only keys; a chat or text eval file."""
    if section == "evaluate":
        for key in ("text_column", "text_pair_column", "label_column"):
            if getattr(cfg, key) is not None:
                raise RecipeError(f"evaluate.{key}: a causal LM is evaluated on chat/instruction JSONL or text, "
                                  f"which have no columns; remove it")
        path = cfg.eval or recipe.data.eval
        if path is not None and not (Path(path).suffix.lower() == ".txt"
                                     or is_chat_data(path, recipe.data.format, cfg.encoding or recipe.data.encoding)):
            raise RecipeError(f"evaluate.eval: {path} is neither chat/instruction JSONL nor .txt text, "
                              f"which is what a causal LM is evaluated on")
    if section == "bench" and cfg.eval is not None:
        raise RecipeError("bench.eval: accuracy inside bench is for classifiers; a causal LM's task metrics come "
                          "from the evaluate stage (exact match, answer perplexity)")


def _stage_list(tree: dict[str, Any], source: str) -> tuple[list[str], dict[str, Any]]:
    """Check the sections and the ``stages`` list; pop both from ``tree``: (stages, {stage: section})."""

    valid = [*SHARED_KEYS, "stages", *ORDER]
    for k in tree:
        if k not in valid:
            raise RecipeError(f"{source}: unknown section '{k}'; valid sections: {', '.join(valid)}")
    stages = tree.pop("stages", None)
    if stages is None:
        stages = [s for s in ORDER if s in tree]
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list of {', '.join(ORDER)} "
                          f"(or give at least one stage section)")
    for s in stages:
        if s not in ORDER:
            raise RecipeError(f"stages: unknown stage {s!r}; valid: {', '.join(ORDER)}")
    if len(set(stages)) != len(stages):
        raise RecipeError(f"stages: a stage is listed twice: {stages}")
    if [s for s in ORDER if s in stages] != stages:
        raise RecipeError(f"stages: must follow the order {' → '.join(ORDER)}, got {' → '.join(stages)}")
    sections = {s: tree.pop(s, None) or {} for s in ORDER}
    for s, sec in sections.items():
        if sec and s not in stages:
            raise RecipeError(f"{s}: section given but '{s}' is not in stages {stages}")
    return list(stages), sections


def check_pipeline_fills(cfg: Any, section: str) -> None:
    """Refuse a recipe value for a field the pipeline fills itself (``PIPELINE_FILLS``: model, output)."""
    for f in dataclasses.fields(cfg):
        if f.name in getattr(cfg, "PIPELINE_FILLS", ()) and getattr(cfg, f.name) != default_of(f):
            raise RecipeError(f"{section}.{f.name}: set by the pipeline itself (model: every model of the run; "
                              f"output: the stage folder); remove it from the recipe")


def _check_stage_settings(cfg: Any, section: str, recipe: Any) -> None:
    """The evaluate/bench/report sections: pipeline-filled fields unset, ranges, files, then defaults."""
    check_pipeline_fills(cfg, section)
    cfg.validate(section)
    if section == "evaluate" and cfg.eval is None and recipe.data.eval is None:
        raise RecipeError("evaluate.eval: no file (and no data.eval)")


def _fixed(max_length: Any) -> int | None:
    """``data.max_length`` for a stage with a fixed one: None (the stage's own default) for ``auto``,
    which only a training stage resolves (it reads the data with the model's tokenizer)."""
    return None if max_length == "auto" else max_length


def _prune_settings(cfg: PruneSettings, recipe: Any, given: dict[str, Any], task: str) -> PruneSettings:
    """The ``prune:`` section completed and checked before the previous stage's folder exists.

    ``train``/``eval``/``max_length``/``max_train_samples``/``max_eval_samples`` come from the
    shared ``data`` section and ``seed`` from ``train`` unless the section (``given``) sets them;
    ``model``/``output`` are set when the stage runs.
    """
    check_pipeline_fills(cfg, "prune")
    d = recipe.data
    shared = {"train": d.train, "eval": d.eval, "max_length": _fixed(d.max_length), "max_train_samples": d.max_train_samples,
              "max_eval_samples": d.max_eval_samples, "seed": recipe.train.seed}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in shared.items() if k not in given and not (k == "max_length" and v is None)})
    check_ranges(cfg, "prune")
    cfg.validate(check_model=False, decoder=task == "causal-lm")
    return cfg


def _quantize_settings(cfg: QuantizeSettings, recipe: Any, given: dict[str, Any], task: str) -> QuantizeSettings:
    """The ``quantize:`` section completed (``eval``/``train``/``max_eval_samples``/``max_length``
    from the shared ``data`` section unless ``given``) and checked; ``model``/``output`` are set
    when the stage runs."""
    check_pipeline_fills(cfg, "quantize")
    d = recipe.data
    shared = {"eval": d.eval, "train": d.train, "max_eval_samples": d.max_eval_samples, "max_length": _fixed(d.max_length)}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in shared.items() if k not in given and not (k == "max_length" and v is None)})
    check_ranges(cfg, "quantize")
    cfg.validate(check_model=False, decoder=task == "causal-lm")
    return cfg


def resolved_tree(plan: Plan) -> dict[str, Any]:
    """The recipe as it runs: shared sections, ``stages`` and every stage's resolved settings
    (``OUT/pipeline.yaml``, ``slimtune run --print-config``); ``slimtune run`` reads it back."""
    return {**plan.tree, "stages": plan.stages,
            **{s: (dataclasses.asdict(c) if dataclasses.is_dataclass(c) else
                   {**dataclasses.asdict(c["distill"]), "train": c["train"]}) for s, c in plan.configs.items()}}


# --------------------------------------------------------------------------------------------
# Fingerprints and the skip rule
# --------------------------------------------------------------------------------------------

FINGERPRINT_SUFFIXES = (".safetensors", ".onnx", ".bin", ".data", ".json", ".txt", ".model", ".yaml")


def fingerprint(paths: list[str]) -> list[Any]:
    """(name, size, mtime_ns) of each file, or of a folder's top-level weight/config/tokenizer
    files (not checkpoints, logs or ``stage.json``): cheap, and changes whenever a file is rewritten."""
    out: list[Any] = []
    for p in paths:
        q = Path(p)
        if q.is_file():
            st = q.stat()
            out.append([str(q.resolve()), st.st_size, st.st_mtime_ns])
        elif q.is_dir():
            files = sorted(f for f in q.iterdir() if f.is_file() and f.suffix in FINGERPRINT_SUFFIXES
                           and f.name not in ("stage.json", "metrics.jsonl"))
            out.append([str(q.resolve()), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]])
        else:
            out.append([str(p), None])
    return out


def stage_key(name: str, config: Any, inputs: list[str]) -> str:
    """Content hash of a stage: its resolved config and the fingerprint of its inputs."""
    def plain(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        return o

    blob = json.dumps({"stage": name, "config": plain(config), "inputs": fingerprint(inputs)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_pipeline(plan: Plan, *, force: bool = False, log: Any = None) -> dict[str, Any]:
    """Run (or skip) every stage of ``plan``; return ``{"stages": [...], "report": rows or None}``."""

    say = log or (lambda msg: print(f"[slimtune run] {msg}", file=sys.stderr, flush=True))
    plan.output.mkdir(parents=True, exist_ok=True)

    atomic_write_text(plan.output / "pipeline.yaml", yaml.safe_dump(resolved_tree(plan), sort_keys=False))
    data = plan.tree.get("data") or {}
    data_files = [f for f in (data.get("train"), data.get("eval")) if f]
    current = resolve_model((plan.tree.get("model") or {}).get("name", "minilm"))
    models: dict[str, str] = {}
    if "finetune" not in plan.stages:
        models["input"] = current
    summary: list[dict[str, Any]] = []
    for name in plan.stages:
        d = plan.stage_dir(name)
        cfg = plan.configs[name]
        inputs = ([current] if name in MODEL_STAGES else list(models.values())) + data_files
        if name == "evaluate" and cfg.eval:
            inputs.append(cfg.eval)
        if name == "report":
            inputs += [str(plan.stage_dir(s)) for s in ("evaluate", "bench") if s in plan.stages]
        key = stage_key(name, {"shared": plan.tree if name in ("finetune", "distill", "prune", "quantize") else None,
                               "stage": cfg}, inputs)
        marker = d / "stage.json"
        old = json.loads(marker.read_text()) if marker.is_file() else {}
        if not force and old.get("key") == key and old.get("status") == "done":
            say(f"{d.name}: unchanged, skipped (stage.json key {key})")
            summary.append({**old, "skipped": True})
            if name in MODEL_STAGES:
                current = str(d)
                models[d.name] = current
            continue
        if (old and old.get("key") != key) or force:
            shutil.rmtree(d, ignore_errors=True)  # changed config/inputs: start the stage afresh
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"stage": name, "key": key, "status": "running", "inputs": inputs,
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        say(f"{d.name}: running")
        t0 = time.monotonic()
        # stage.json owns the stage folder: a stage that reruns replaces a result it left (a crash
        # after the result, before "done"); an interrupted training stage resumes (no result yet)
        replace = (d / "metrics.json").is_file()
        if name == "finetune":

            tree = deep_merge(plan.tree, {"output": str(d), "overwrite": replace, "train": cfg.train,
                                          "method": cfg.method})
            run_finetune(resolve(tree, plan.source))
        elif name == "distill":

            tree = deep_merge(plan.tree, {"output": str(d), "overwrite": replace, "model": {"name": current},
                                          "train": cfg["train"]})
            run_distill(resolve(tree, plan.source), cfg["distill"])
        elif name == "prune":
            run_prune(dataclasses.replace(cfg, model=current, output=str(d), overwrite=True))  # atomic, like quantize
        elif name == "quantize":
            _run_quantize(plan, cfg, current, d)
        elif name == "evaluate":
            (_run_evaluate_decoders if plan.task == "causal-lm" else _run_evaluate)(plan, cfg, models, d)
        elif name == "bench":
            (_run_bench_decoders if plan.task == "causal-lm" else _run_bench)(cfg, models, d)
        elif name == "report":
            _run_report(plan, cfg, models, d)
        seconds = round(time.monotonic() - t0, 1)
        atomic_write_json(d / "stage.json", {"stage": name, "key": key, "status": "done", "inputs": inputs,
                                             "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        say(f"{d.name}: done in {seconds:.0f} s")
        summary.append({"stage": name, "key": key, "status": "done", "seconds": seconds, "skipped": False})
        if name in MODEL_STAGES:
            current = str(d)
            models[d.name] = current
    rows = None
    if "report" in plan.stages:
        rows = json.loads((plan.stage_dir("report") / "report.json").read_text())["rows"]
    return {"stages": summary, "rows": rows, "output": str(plan.output)}


def _run_quantize(plan: Plan, cfg: QuantizeSettings, current: str, d: Path) -> None:
    """Quantize the previous stage's model into ``d`` (its data paths were filled at validation)."""
    # run_quantize replaces the folder atomically when done (stage.json is rewritten after it)
    run_quantize(dataclasses.replace(cfg, model=current, output=str(d), overwrite=True))
    _restore_threads()


def _restore_threads() -> None:
    # quantize/bench pin torch to the latency thread count; later training stages want all cores

    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.pop("SLIMTUNE_THREADS", None)


def _run_evaluate(plan: Plan, cfg: EvaluateSettings, models: dict[str, str], d: Path) -> None:
    """Every model of the run on ``cfg.eval`` (default ``data.eval``): ``evaluation.json``."""

    data = plan.tree.get("data") or {}
    path = cfg.eval or data.get("eval")
    results = {}
    for name, m in models.items():
        results[name] = evaluate_model_dir(m, path, max_eval_samples=cfg.max_eval_samples,
                                           max_length=cfg.max_length or _fixed(data.get("max_length")),
                                           batch_size=cfg.batch_size, text_column=cfg.text_column,
                                           text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                                           encoding=cfg.encoding, skip_bad_rows=cfg.skip_bad_rows)
        print(f"[slimtune run] evaluate {name}: accuracy {results[name]['accuracy']:.4f}", file=sys.stderr)
    atomic_write_json(d / "evaluation.json", {"eval_file": path, "models": results})


def _run_evaluate_decoders(plan: Plan, cfg: EvaluateSettings, models: dict[str, str], d: Path) -> None:
    """Every causal LM of the run on ``cfg.eval`` (default ``data.eval``), as ``slimtune evaluate`` does:
    answer perplexity, exact match / label accuracy and samples on chat data, perplexity on text.
    ``evaluation.json`` holds them all; ``NAME.metrics.json`` each one."""
    data = plan.tree.get("data") or {}
    path = cfg.eval or data.get("eval")
    results = {}
    for name, m in models.items():
        results[name] = run_evaluate(m, path, output=str(d / f"{name}.metrics.json"), batch_size=cfg.batch_size,
                                     max_length=cfg.max_length or _fixed(data.get("max_length")),
                                     encoding=cfg.encoding, skip_bad_rows=cfg.skip_bad_rows,
                                     max_eval_samples=cfg.max_eval_samples)
        shown = [f"{k.replace('_', ' ')} {results[name][k]:.4f}" for k in ("exact_match", "accuracy", "answer_perplexity",
                                                                             "perplexity") if k in results[name]]
        print(f"[slimtune run] evaluate {name}: {', '.join(shown[:3])}", file=sys.stderr)
    atomic_write_json(d / "evaluation.json", {"eval_file": path, "task": "causal-lm", "models": results})


def _run_bench_decoders(cfg: BenchSettings, models: dict[str, str], d: Path) -> None:
    """Every causal LM of the run timed side by side (prefill latency, decoding ms/token):
    ``bench.json`` and ``bench.md``."""
    res = bench_decoders(models, batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens, threads=cfg.threads,
                         repeats=cfg.repeats, warmup=cfg.warmup, min_seconds=cfg.min_seconds)
    _restore_threads()
    atomic_write_json(d / "bench.json", res)
    lines = ["", "decoding (KV cache, after the prompt):", "", "| model | threads | batch | prompt | ms/token | tokens/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, r in res["models"].items():
        lines += [f"| {n} | {e['threads']} | {e['batch_size']} | {e['seq_len']} | {e['decode_ms_per_token']:.2f} | "
                  f"{e['decode_tokens_per_s']:.1f} |" for e in r["latency"]]
    atomic_write_text(d / "bench.md", "latency = prefill of the prompt (time to first token)\n" + format_bench(res)
                      + "\n" + "\n".join(lines) + "\n")


def _run_bench(cfg: BenchSettings, models: dict[str, str], d: Path) -> None:
    """Every model of the run timed side by side: ``bench.json`` and ``bench.md``."""

    res = bench_models(models, batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens, threads=cfg.threads,
                       repeats=cfg.repeats, warmup=cfg.warmup, min_seconds=cfg.min_seconds,
                       eval_path=cfg.eval, max_eval_samples=cfg.max_eval_samples)
    _restore_threads()
    atomic_write_json(d / "bench.json", res)
    atomic_write_text(d / "bench.md", format_bench(res) + "\n")


# what a report row takes from evaluation.json: a classifier's accuracy; a causal LM's task metrics
# (accuracy / macro-F1 / per-class: the label an answer names, when the references are a label set)
REPORT_METRICS = ("accuracy", "macro_f1", "per_class", "exact_match", "no_label", "answer_perplexity", "perplexity")


def _decoder_meta(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One line per causal LM with the figures the report table has no column for."""
    keys = (("exact_match", "exact match", "{:.4f}"), ("answer_perplexity", "answer perplexity", "{:.3f}"),
            ("perplexity", "perplexity", "{:.3f}"), ("decode_ms_per_token", "decoding ms/token", "{:.2f}"))
    out = {}
    for r in rows:
        shown = [f"{label} {fmt.format(r[k])}" for k, label, fmt in keys if r.get(k) is not None
                 and not (k == "perplexity" and r.get("answer_perplexity") is not None)]
        if shown:
            out[f"{r['name']} (causal LM)"] = ", ".join(shown)
    if any(r.get("accuracy") is not None for r in rows):
        out["accuracy (causal LM)"] = ("the label a generated answer names (the references are a label set); exact "
                                       "match: the whole normalised answer equals the reference")
    return out


def _run_report(plan: Plan, cfg: ReportSettings, models: dict[str, str], d: Path) -> None:
    """The trade-off report of every model of the run (also copied to the top of OUT)."""

    ev = bench = None
    if "evaluate" in plan.stages:
        ev = json.loads((plan.stage_dir("evaluate") / "evaluation.json").read_text())
    if "bench" in plan.stages:
        bench = json.loads((plan.stage_dir("bench") / "bench.json").read_text())
    at = None
    if bench:
        s = bench["settings"]
        at = (s["threads"][0], s["batch_sizes"][0], s["seq_lens"][0])
    rows = []
    for name, m in models.items():
        r: dict[str, Any] = {"name": name, "path": m, "kind": model_kind(m), "params": count_stored_params(m),
                             "size_mb": weights_size_mb(m)}
        if ev and name in ev["models"]:
            e = ev["models"][name]
            r.update({k: e[k] for k in REPORT_METRICS if k in e})
        if bench and name in bench["models"]:
            lat = latency_at(bench["models"][name], *at)
            if lat:
                r.update(latency_ms_p50=lat["p50_ms"], latency_ms_p95=lat["p95_ms"])
                if "decode_ms_per_token" in lat:
                    r["decode_ms_per_token"] = lat["decode_ms_per_token"]
        if (Path(m) / "metrics.jsonl").is_file() and name != "input":
            r["metrics_jsonl"] = str(Path(m) / "metrics.jsonl")
        rows.append(r)
    ref = cfg.reference
    if ref == "auto":
        ref = "finetune" if "finetune" in plan.stages else "input"
    teacher = plan.stage_dir("finetune").name if ref == "finetune" and "finetune" in plan.stages else "input"
    meta: dict[str, Any] = {"recipe": plan.source, "stages": " → ".join(plan.stages)}
    if ev:
        meta["accuracy on"] = ev["eval_file"]
    if plan.task == "causal-lm":
        meta.update(_decoder_meta(rows))
    if at:
        meta["latency setting"] = f"threads {at[0]}, batch {at[1]}, seq {at[2]}, interleaved, one run"
    meta["hardware"] = bench["hardware"] if bench else hardware_fingerprint()
    paths = write_report(d, rows, title=cfg.title or f"slimtune run: {plan.output.name}", teacher=teacher, meta=meta)
    for p in paths.values():  # the report is the run's front page: also at the top of OUT
        shutil.copy2(p, plan.output / p.name)
