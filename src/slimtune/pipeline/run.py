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

Re-running skips a stage whose config and inputs are unchanged: ``stage.json`` in its folder
stores a hash of the stage's resolved config and a fingerprint (name, size, mtime) of its
input folders' weight/config/tokenizer files and data files. A changed stage reruns, and so do
the stages after it (their input changed). A stage that was interrupted reruns in place, so
training resumes from its last checkpoint.

Top-level imports are stdlib only (the CLI parser imports this module).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from slimtune.benchmark.latency import bench_models, format_bench, latency_at
from slimtune.benchmark.timing import hardware_fingerprint
from slimtune.compress.distill.recipe import run_distill
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.prune.recipe import PruneSettings, run_prune
from slimtune.compress.quant.recipe import make_config, run_quantize
from slimtune.config.recipe import (
    RecipeError,
    build_section,
    deep_merge,
    load_yaml,
    parse_override,
    resolve,
    set_path,
)
from slimtune.data.packaged import expand_tree
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.io import atomic_write_json, atomic_write_text, weights_size_mb
from slimtune.models.loading import check_exists
from slimtune.models.loading import resolve as resolve_model
from slimtune.report.html import write_report
from slimtune.runtime.folders import count_stored_params, model_kind
from slimtune.train.finetune import run_finetune

ORDER = ("finetune", "distill", "prune", "quantize", "evaluate", "bench", "report")
MODEL_STAGES = ("finetune", "distill", "prune", "quantize")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# Stage sections
# --------------------------------------------------------------------------------------------


@dataclass
class FinetuneStage:
    """``finetune:``: fine-tune ``model.name`` on ``data`` (overrides of the shared sections)."""

    train: dict = _f({}, "Overrides of the shared train section for this stage, e.g. {epochs: 2}.")
    method: dict = _f({}, "Overrides of the shared method section, e.g. {name: lora, r: 8}.")


@dataclass
class PruneStage:
    """``prune:``: vocabulary / layers / FFN / unstructured pruning of the previous model."""

    vocab: bool = _f(False, "Keep only the tokens data.train uses (exact on that text).")
    vocab_min_count: int = _f(1, "Drop tokens seen fewer times (1 keeps corpus tokenization identical).")
    ffn: float = _f(0.0, "Fraction of FFN neurons removed in every layer.")
    layers: int = _f(0, "Whole layers removed (greedy, by logit change).")
    sparsity: float = _f(0.0, "Unstructured magnitude sparsity (does not shrink files or speed up dense CPU inference).")
    pattern: str = _f("unstructured", "'unstructured' or N:M such as 2:4.")
    importance: Literal["taylor", "magnitude"] = _f("taylor", "How FFN neurons are ranked.")
    recover_steps: int = _f(0, "Recovery fine-tuning steps after pruning.")
    kd: bool = _f(False, "Distil from the unpruned model during recovery.")
    kd_alpha: float = _f(0.5, "Weight of the KD term in recovery.")
    kd_temperature: float = _f(2.0, "KD temperature in recovery.")
    lr: float = _f(1e-4, "Recovery learning rate.")
    batch_size: int = _f(32, "Recovery batch size.")


@dataclass
class QuantizeStage:
    """``quantize:``: quantize the previous model (see docs/quantization.md)."""

    scheme: Literal["int8", "int4", "nf4", "kmeans", "fp32"] = _f("int8", "Quantization scheme.")
    backend: Literal["auto", "torch", "torchao", "onnxruntime"] = _f("auto", "int8 runtime (auto: fastest with parity, measured).")
    granularity: str | None = _f(None, "tensor | channel | group (scheme default if unset).")
    group_size: int | None = _f(None, "Weights per scale with group granularity; nf4 block size.")
    bits: int | None = _f(None, "kmeans code width.")
    include_embeddings: bool = _f(True, "Quantize embedding tables too.")
    min_sqnr_db: float = _f(20.0, "Logits SQNR (dB) an int8 backend must keep to be chosen.")
    max_accuracy_drop: float = _f(0.5, "Accuracy points quantization may cost vs its input.")
    qat_steps: int = _f(0, "int4/nf4/kmeans: fake-quant recovery steps on data.train.")
    calib_samples: int = _f(256, "int8: calibration rows (from data.train) for the mixed-precision search.")
    repeats: int = _f(30, "Interleaved timing rounds for the backend choice.")
    threads: int = _f(1, "Threads of the latency measurement that picks the backend.")
    batch_size: int = _f(1, "Batch size of that measurement.")
    seq_len: int = _f(128, "Sequence length of that measurement.")


@dataclass
class EvaluateStage:
    """``evaluate:``: accuracy, macro-F1, per-class report of every model of the run."""

    eval: str | None = _f(None, "Labelled file (default data.eval). Use a held-out test file here.")
    max_eval_samples: int | None = _f(None, "Evaluate on N rows only.")
    batch_size: int = _f(64, "Evaluation batch size.")


@dataclass
class BenchStage:
    """``bench:``: every model of the run timed side by side (see ``slimtune bench``)."""

    batch_sizes: list[int] = _f([1], "Batch sizes.")
    seq_lens: list[int] = _f([128], "Sequence lengths.")
    threads: list[int] = _f([1], "Intra-op thread counts.")
    repeats: int = _f(30, "Interleaved timing rounds per setting.")
    warmup: int = _f(5, "Untimed calls per model first.")


@dataclass
class ReportStage:
    """``report:``: HTML + Markdown + JSON trade-off report of the run."""

    title: str | None = _f(None, "Page title (default: the output folder's name).")
    reference: Literal["auto", "finetune", "input"] = _f("auto", "Row retention and ratios refer to (auto: finetune if run, else input).")


STAGE_CLASSES: dict[str, type] = {"finetune": FinetuneStage, "prune": PruneStage, "quantize": QuantizeStage,
                                  "evaluate": EvaluateStage, "bench": BenchStage, "report": ReportStage}


@dataclass
class Plan:
    """A validated pipeline: shared tree, stage configs, output folder."""

    tree: dict[str, Any]  # output/model/data/train/method: the fine-tune recipe sections
    stages: list[str]
    configs: dict[str, Any]  # stage -> its dataclass (distill: (train overrides, DistillConfig))
    output: Path
    source: str

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
    shared_keys = ("output", "model", "data", "train", "method")
    valid = [*shared_keys, "stages", *ORDER]
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
    if not tree.get("output"):
        raise RecipeError(f"{source}: 'output' (the pipeline's folder) is required")
    base = {k: tree[k] for k in shared_keys if k in tree}
    recipe = resolve(base, source)  # model/data/train/method: strict, files checked
    if recipe.model.task != "classification" and any(s in stages for s in ("distill", "prune", "quantize", "bench")):
        raise RecipeError("model.task: the compression stages support classification only")
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
            _prune_settings(cfg, recipe, "minilm", "-").validate()  # the model folder does not exist yet
        elif s == "quantize":

            make_config(cfg.scheme, granularity=cfg.granularity, group_size=cfg.group_size, bits=cfg.bits,
                        include_embeddings=cfg.include_embeddings)
        elif s == "evaluate":
            if cfg.eval is None and recipe.data.eval is None:
                raise RecipeError("evaluate.eval: no file (and no data.eval)")
            if cfg.eval is not None and not Path(cfg.eval).is_file():
                raise RecipeError(f"evaluate.eval: file not found: {cfg.eval}")
        elif s == "bench":
            for k in ("batch_sizes", "seq_lens", "threads"):
                if not getattr(cfg, k) or any(v < 1 for v in getattr(cfg, k)):
                    raise RecipeError(f"bench.{k}: positive integers required, got {getattr(cfg, k)}")
        configs[s] = cfg
    if "finetune" not in stages and any(s in stages for s in MODEL_STAGES):

        check_exists(recipe.model.name)
    return Plan(tree=base, stages=list(stages), configs=configs, output=Path(recipe.output), source=source)


def _prune_settings(cfg: PruneStage, recipe: Any, model: str, output: str) -> Any:

    d = recipe.data
    return PruneSettings(model=model, output=output, train=d.train, eval=d.eval, sparsity=cfg.sparsity,
                         pattern=cfg.pattern, ffn=cfg.ffn, layers=cfg.layers, importance=cfg.importance,
                         vocab_from=[d.train] if cfg.vocab and d.train else [], vocab_min_count=cfg.vocab_min_count,
                         recover_steps=cfg.recover_steps, kd=cfg.kd, kd_alpha=cfg.kd_alpha,
                         kd_temperature=cfg.kd_temperature, lr=cfg.lr, batch_size=cfg.batch_size,
                         max_length=d.max_length, max_train_samples=d.max_train_samples,
                         max_eval_samples=d.max_eval_samples, seed=recipe.train.seed)


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

    atomic_write_text(plan.output / "pipeline.yaml", yaml.safe_dump(
        {**plan.tree, "stages": plan.stages,
         **{s: (dataclasses.asdict(c) if dataclasses.is_dataclass(c) else
                {**dataclasses.asdict(c["distill"]), "train": c["train"]}) for s, c in plan.configs.items()}},
        sort_keys=False))
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
        if name == "finetune":

            tree = deep_merge(plan.tree, {"output": str(d), "train": cfg.train, "method": cfg.method})
            run_finetune(resolve(tree, plan.source))
        elif name == "distill":

            tree = deep_merge(plan.tree, {"output": str(d), "model": {"name": current}, "train": cfg["train"]})
            run_distill(resolve(tree, plan.source), cfg["distill"])
        elif name == "prune":

            recipe = resolve(deep_merge(plan.tree, {"output": str(d)}), plan.source)
            run_prune(_prune_settings(cfg, recipe, current, str(d)))
        elif name == "quantize":
            _run_quantize(plan, cfg, current, d)
        elif name == "evaluate":
            _run_evaluate(plan, cfg, models, d)
        elif name == "bench":
            _run_bench(cfg, models, d)
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


def _run_quantize(plan: Plan, cfg: QuantizeStage, current: str, d: Path) -> None:

    data = plan.tree.get("data") or {}
    # run_quantize replaces the folder atomically when done (stage.json is rewritten after it)
    run_quantize(current, cfg.scheme, str(d), eval_path=data.get("eval"), granularity=cfg.granularity,
                 group_size=cfg.group_size, bits=cfg.bits, include_embeddings=cfg.include_embeddings,
                 backend=cfg.backend, repeats=cfg.repeats, threads=cfg.threads, batch_size=cfg.batch_size,
                 seq_len=cfg.seq_len, min_sqnr_db=cfg.min_sqnr_db,
                 max_accuracy_drop=cfg.max_accuracy_drop, max_eval_samples=data.get("max_eval_samples"),
                 max_length=data.get("max_length"), qat_steps=cfg.qat_steps, train_path=data.get("train"),
                 calib_samples=cfg.calib_samples)
    _restore_threads()


def _restore_threads() -> None:
    # quantize/bench pin torch to the latency thread count; later training stages want all cores

    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.pop("SLIMTUNE_THREADS", None)


def _run_evaluate(plan: Plan, cfg: EvaluateStage, models: dict[str, str], d: Path) -> None:

    data = plan.tree.get("data") or {}
    path = cfg.eval or data.get("eval")
    results = {}
    for name, m in models.items():
        results[name] = evaluate_model_dir(m, path, max_eval_samples=cfg.max_eval_samples,
                                           max_length=data.get("max_length"), batch_size=cfg.batch_size)
        print(f"[slimtune run] evaluate {name}: accuracy {results[name]['accuracy']:.4f}", file=sys.stderr)
    atomic_write_json(d / "evaluation.json", {"eval_file": path, "models": results})


def _run_bench(cfg: BenchStage, models: dict[str, str], d: Path) -> None:

    res = bench_models(models, batch_sizes=cfg.batch_sizes, seq_lens=cfg.seq_lens, threads=cfg.threads,
                       repeats=cfg.repeats, warmup=cfg.warmup)
    _restore_threads()
    atomic_write_json(d / "bench.json", res)
    atomic_write_text(d / "bench.md", format_bench(res) + "\n")


def _run_report(plan: Plan, cfg: ReportStage, models: dict[str, str], d: Path) -> None:

    ev = bench = None
    if "evaluate" in plan.stages:
        ev = json.loads((plan.stage_dir("evaluate") / "evaluation.json").read_text())
    if "bench" in plan.stages:
        bench = json.loads((plan.stage_dir("bench") / "bench.json").read_text())
    setting = None
    if bench:
        s = bench["settings"]
        setting = (s["threads"][0], s["batch_sizes"][0], s["seq_lens"][0])
    rows = []
    for name, m in models.items():
        r: dict[str, Any] = {"name": name, "path": m, "kind": model_kind(m), "params": count_stored_params(m),
                             "size_mb": weights_size_mb(m)}
        if ev and name in ev["models"]:
            e = ev["models"][name]
            r.update(accuracy=e["accuracy"], macro_f1=e["macro_f1"], per_class=e["per_class"])
        if bench and name in bench["models"]:
            lat = latency_at(bench["models"][name], *setting)
            if lat:
                r.update(latency_ms_p50=lat["p50_ms"], latency_ms_p95=lat["p95_ms"])
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
    if setting:
        meta["latency setting"] = f"threads {setting[0]}, batch {setting[1]}, seq {setting[2]}, interleaved, one run"
    meta["hardware"] = bench["hardware"] if bench else hardware_fingerprint()
    paths = write_report(d, rows, title=cfg.title or f"slimtune run: {plan.output.name}", teacher=teacher, meta=meta)
    for p in paths.values():  # the report is the run's front page: also at the top of OUT
        shutil.copy2(p, plan.output / p.name)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------




