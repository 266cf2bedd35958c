"""``slimtune compress``: search distillation x pruning x quantization under an accuracy constraint.

Given a fine-tuned classifier (the *teacher*), training and evaluation files and a maximum
accuracy drop, the search builds candidates as a tree, every step calling the stage modules:

- ``v``: vocabulary pruned to the training corpus (:func:`slimtune.compress.prune.recipe.run_prune`, exact on it);
- ``S{d}``: a static-embedding student of ``v`` (token table of width d + linear head, model2vec's
  distillation then KD on the teacher's soft labels, :func:`slimtune.compress.distill.static.run_static`),
  and ``S{d}-int8`` (its table stored as int8 rows);
- ``L{d}``: a d-layer student distilled from ``v`` (:func:`slimtune.compress.distill.recipe.run_distill`);
- ``L{d}-ffn{p}``: its FFN pruned by p% with KD recovery (:func:`slimtune.compress.prune.recipe.run_prune`);
- ``...-int8``: each of them through int8 ONNX Runtime, embeddings included
  (:func:`slimtune.compress.quant.recipe.run_quantize`).

Order: cheap first (``v``, ``v-int8`` need no training, the static students take seconds), then student depths by bisection
(start in the middle of ``--depths``; a depth with a feasible candidate sends the search to
shallower students, an infeasible one to deeper), the most aggressive FFN ratio of a depth only
after the milder ones stayed feasible. Steps whose predicted size cannot meet ``--max-size-mb``,
and steps that no longer fit the time budget, are skipped and listed with the reason.

Every candidate is kept (``OUT/candidates/<name>/`` with ``candidate.json``); a re-run with the
same settings reuses finished candidates. At the end all candidates and the input are timed in
ONE interleaved run (:func:`slimtune.benchmark.latency.bench_models`), the Pareto front (accuracy vs size
vs latency) is marked, and the smallest/fastest candidate meeting every constraint is copied to
``OUT/best/``. When none meets them, the command says so, still copies the closest one and
keeps all of them. Outputs: ``OUT/best/`` (+ ``metrics.json``), ``OUT/candidates.json``,
``OUT/report.html`` (+ ``.md``, ``.json``), ``OUT/summary.json`` and the settings,
``OUT/compress.yaml`` (read back by ``slimtune compress --config``; also ``compress.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.benchmark.latency import bench_models, latency_at, model_inputs
from slimtune.benchmark.timing import hardware_fingerprint, measure_latency, set_threads
from slimtune.compress.distill.recipe import run_distill
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.distill.static import StaticSettings, restore_static, run_static
from slimtune.compress.inputs import is_causal_lm_folder
from slimtune.compress.prune.recipe import PruneSettings, run_prune
from slimtune.compress.quant.recipe import run_quantize
from slimtune.compress.quant.settings import QuantizeSettings
from slimtune.config.fields import RecipeError, check_ranges, save_settings, setting
from slimtune.config.recipe import resolve
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.report.html import pareto_front, write_report
from slimtune.runtime.classifier import load_predict
from slimtune.runtime.folders import count_stored_params, model_kind


@dataclass
class CompressSettings:
    """Everything ``slimtune compress`` does (each field is a flag); saved as ``OUT/compress.yaml``
    (what ``--config`` reads back) and ``OUT/compress.json``."""

    model: str = setting(help="Fine-tuned classifier or causal-LM folder: the teacher and the reference (a causal LM runs the decoder search, slimtune.pipeline.search_decoder).", metavar="DIR")
    train: str = setting(help="Training file (distillation, recovery, vocabulary).", metavar="FILE")
    eval: str = setting(help="Labelled file the accuracy constraint is checked on (use a dev split).", metavar="FILE")
    output: str = setting(help="Output folder (best/, candidates/, report, the settings).", metavar="DIR")
    max_accuracy_drop: float = setting(help="Accuracy points the result may lose vs --model on --eval (1 = one point; decoders: exact-match points).", ge=0)
    max_perplexity_increase: float = setting(5.0, "Decoders: answer (or text) perplexity on --eval may rise by at most P percent vs --model.", ge=0)
    test: str | None = setting(None, "Held-out labelled file: accuracy reported for every candidate, never used to choose.", metavar="FILE")
    max_size_mb: float | None = setting(None, "Also require weights on disk <= S MB.", gt=0)
    max_latency_ms: float | None = setting(None, "Also require p50 latency <= L ms (at the bench setting below).", gt=0)
    budget_minutes: float = setting(30.0, "Wall-clock budget of the search.", gt=0)
    depths: list[int] = setting([2, 3, 4], "Student layer counts to consider, comma-separated.", ge=1, metavar="N[,N...]")
    ffn: list[float] = setting([0.5], "FFN fractions to remove, comma-separated.", gt=0, lt=1, metavar="F[,F...]")
    vocab: bool = setting(True, "Prune the vocabulary to --train (--no-vocab: keep it).")
    quant: list[Literal["int8", "int4", "none"]] | None = setting(None, "Quantized variants, comma-separated: int8 (classifiers: ONNX Runtime; decoders: llama.cpp q8_0 or torch int8, by measurement), int4 (decoders: llama.cpp q4_0 / q4_k_m or torch int4, by measurement) and/or none. None: int8 for classifiers, int8,int4 for decoders.", metavar="Q[,Q...]")
    keep_layers: list[float] = setting([0.8, 0.67], "Decoders: layers to keep, one depth candidate each (a count, or a fraction < 1 of the model's layers; ShortGPT block influence chooses them, KD recovers), comma-separated; empty: no depth pruning.", gt=0, metavar="K[,K...]")
    max_train_samples: int | None = setting(8000, "Training rows per training step.", ge=1)
    max_eval_samples: int | None = setting(None, "Evaluate on N rows of --eval (a seeded sample; default all).", ge=1)
    max_length: int = setting(128, "Tokens per example for training and evaluation.", ge=1)
    epochs: float = setting(1.0, "Distillation epochs.", gt=0)
    lr: float | None = setting(None, "Learning rate of distillation and recovery (None: the full method's declared default, 1e-4; the student trains in full).", gt=0)
    batch_size: int | None = setting(None, "Training batch size (None: 32 for classifiers, 8 for decoders).", ge=1)
    recover_steps: int | None = setting(None, "KD recovery steps after pruning (None: 200 after a classifier's FFN pruning, 60 after a decoder's depth pruning).", ge=0)
    static_dims: list[int] = setting([256, 64], "Static-embedding students (token table + linear head, model2vec-style, trained by KD), one per width, comma-separated; empty: none.", ge=1, metavar="D[,D...]")
    static_epochs: float = setting(10.0, "Training epochs of the static-embedding students.", gt=0)
    alpha: float = setting(0.5, "Weight of hard-label CE in distillation (1 - alpha on the KD term).", ge=0, le=1)
    temperature: float = setting(2.0, "Distillation softmax temperature.", gt=0)
    threads: int = setting(1, "Threads for every latency number.", ge=1)
    bench_batch_size: int = setting(1, "Batch size of the latency measurements.", ge=1)
    bench_seq_len: int = setting(128, "Sequence length of the latency measurements.", ge=2)
    bench_repeats: int = setting(50, "Interleaved rounds of the final side-by-side bench.", ge=1)
    prefer: Literal["balanced", "size", "latency"] = setting("balanced", "Among feasible candidates: balanced (size x latency), size or latency first.")
    seed: int = setting(42, "Seed of sampling, distillation and recovery.")

    def validate(self) -> None:
        """Check ranges and files before anything loads (errors name the flag)."""

        check_ranges(self, "--")
        if not (Path(self.model) / "config.json").is_file():
            raise RecipeError(f"--model: not a model folder (no config.json): {self.model}")
        for flag, path in (("--train", self.train), ("--eval", self.eval), ("--test", self.test)):
            if path is not None and not Path(path).is_file():
                raise RecipeError(f"{flag}: file not found: {path}")
        bad = [q for q in self.quant or [] if q not in ("int8", "int4", "none")]
        if bad:
            raise RecipeError(f"--quant: {bad[0]!r} is not one of ['int8', 'int4', 'none']")
        if "int4" in (self.quant or []) and not self.decoder:
            raise RecipeError("--quant: int4 is for decoders (a classifier's int8 runs on ONNX Runtime; int4 has no "
                              "faster kernel for it here)")
        if self.prefer not in ("balanced", "size", "latency"):
            raise RecipeError(f"--prefer: {self.prefer!r} is not one of ['balanced', 'size', 'latency']")
        if Path(self.output).resolve() == Path(self.model).resolve():
            raise RecipeError("--output must differ from --model")

    @property
    def decoder(self) -> bool:
        """The input is a causal LM (the decoder search runs)."""
        return is_causal_lm_folder(self.model)

    def resolved(self) -> CompressSettings:
        """These settings with the task-dependent defaults filled in (what ``compress.yaml`` records)."""
        dec = self.decoder
        return dataclasses.replace(
            self, quant=self.quant if self.quant is not None else (["int8", "int4"] if dec else ["int8"]),
            recover_steps=self.recover_steps if self.recover_steps is not None else (60 if dec else 200),
            batch_size=self.batch_size if self.batch_size is not None else (8 if dec else 32))


# --------------------------------------------------------------------------------------------
# Size prediction (BERT-family encoders): skip steps that cannot meet --max-size-mb
# --------------------------------------------------------------------------------------------


def predict_size_mb(cfg: dict[str, Any], *, layers: int, ffn_keep: float = 1.0, vocab: int | None = None,
                    int8: bool = False) -> float:
    """Approximate weight-file size of a BERT-like classifier with this shape.

    Matrices (embeddings, q/k/v/o, FFN, pooler) cost 1 byte per weight in int8 (ONNX Runtime
    per-channel; scales are negligible) and 4 in fp32; biases and LayerNorms stay fp32.
    """
    h = int(cfg.get("hidden_size", 384))
    inter = int(int(cfg.get("intermediate_size", 4 * h)) * ffn_keep) // 8 * 8
    v = vocab or int(cfg.get("vocab_size", 30522))
    pos = int(cfg.get("max_position_embeddings", 512))
    types = int(cfg.get("type_vocab_size", 2))
    labels = len(cfg.get("id2label") or {}) or 2
    mats = (v + pos + types) * h + layers * (4 * h * h + 2 * h * inter) + h * h + h * labels
    vecs = layers * (4 * h + inter + h + 4 * h) + 2 * h + h + labels
    return (mats * (1 if int8 else 4) + vecs * 4) / 1e6


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


class Search:
    """State of one compress run: candidates, budget, the constraint, the log."""

    def __init__(self, s: CompressSettings, log: Any = None):

        self.s = s
        self.out = Path(s.output)
        self.cand_dir = self.out / "candidates"
        self.cand_dir.mkdir(parents=True, exist_ok=True)
        self.say = log or (lambda msg: print(f"[slimtune compress] {msg}", file=sys.stderr, flush=True))
        self.t0 = time.monotonic()
        self.deadline = self.t0 + s.budget_minutes * 60
        self.train_threads = torch.get_num_threads()
        self.cands: dict[str, dict[str, Any]] = {}
        self.costs: dict[str, float] = {}  # kind of step -> seconds of the last one
        self.teacher_cfg = json.loads((Path(s.model) / "config.json").read_text())
        self.min_accuracy: float | None = None
        self.eval_key = [s.eval, s.max_eval_samples, s.max_length]  # accuracies are comparable iff equal
        self._ref: Any = None  # teacher predict + inputs for quick latency probes
        self.last_depth = 1  # depth of the last distilled student (scales the next one's cost)

    # --- bookkeeping -------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, kind: str, scale: float = 1.0) -> bool:
        """Whether a step of ``kind`` is expected to finish before the deadline (keeps a reserve
        for the final side-by-side bench and report)."""
        reserve = 30.0 + 8.0 * len(self.cands)
        est = self.costs.get(kind, 0.0) * scale
        return self.remaining() - reserve > est

    def record(self, name: str, **kw: Any) -> dict[str, Any]:
        c = self.cands.setdefault(name, {"name": name})
        c.update(kw)
        self.save()
        return c

    def save(self) -> None:

        atomic_write_json(self.out / "candidates.json", list(self.cands.values()))

    def feasible(self, c: dict[str, Any], use_final: bool = False) -> bool:
        """Meets the accuracy, size and latency constraints (latency: probe during the search)."""
        s = self.s
        if c.get("status") != "ok" or c.get("accuracy") is None:
            return False
        if c["accuracy"] < self.min_accuracy - 1e-12:
            return False
        if s.max_size_mb is not None and c["size_mb"] > s.max_size_mb:
            return False
        lat = c.get("latency_ms_p50") if use_final else c.get("latency_ms_probe")
        return not (s.max_latency_ms is not None and lat is not None and lat > s.max_latency_ms)

    # --- one candidate -----------------------------------------------------------------------

    def build(self, name: str, parent: str | None, settings: dict[str, Any], kind: str,
              make: Any, predicted_mb: float | None = None) -> dict[str, Any] | None:
        """Build (or reuse) candidate ``name`` with ``make(out_dir)``, then evaluate and probe it."""
        d = self.cand_dir / name
        marker = d / "candidate.json"
        if marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("settings") == settings and old.get("status") == "ok" and old.get("eval_key") == self.eval_key:
                self.say(f"{name}: reusing {d}")
                self.cands[name] = old
                self.save()
                return old
        if self.s.max_size_mb is not None and predicted_mb is not None and predicted_mb > 1.05 * self.s.max_size_mb:
            self.record(name, parent=parent, settings=settings, status="skipped",
                        reason=f"predicted size {predicted_mb:.1f} MB > --max-size-mb {self.s.max_size_mb}")
            self.say(f"{name}: skipped ({self.cands[name]['reason']})")
            return None
        if not self.fits(kind):
            self.record(name, parent=parent, settings=settings, status="skipped",
                        reason=f"time budget: {self.remaining():.0f} s left, a {kind} step took "
                               f"{self.costs.get(kind, 0):.0f} s")
            self.say(f"{name}: skipped ({self.cands[name]['reason']})")
            return None
        self.say(f"{name}: building ({kind}; {self.remaining() / 60:.1f} min of budget left)")
        shutil.rmtree(d, ignore_errors=True)
        t = time.monotonic()
        try:
            make(d)
            self._restore_threads()
            c = self.measure(name, d)
        except Exception as e:  # one failed candidate must not end the search
            self._restore_threads()
            self.record(name, parent=parent, settings=settings, status="failed", path=str(d),
                        reason=f"{type(e).__name__}: {e}", seconds=round(time.monotonic() - t, 1))
            self.say(f"{name}: FAILED: {type(e).__name__}: {e}")
            return None
        self.costs[kind] = time.monotonic() - t
        c = self.record(name, parent=parent, settings=settings, status="ok", path=str(d),
                        seconds=round(self.costs[kind], 1), eval_key=self.eval_key, **c)

        atomic_write_json(marker, c)
        ok = "meets" if self.feasible(c) else "misses"
        self.say(f"{name}: accuracy {c['accuracy']:.4f}, {c['size_mb']:.2f} MB, ~{c['latency_ms_probe']:.1f} ms "
                 f"({ok} the constraints) in {self.costs[kind]:.0f} s")
        return c

    def _restore_threads(self) -> None:
        # quantize/bench set 1 thread for latency; training and evaluation use all cores again

        torch.set_num_threads(self.train_threads)
        os.environ.pop("SLIMTUNE_THREADS", None)

    def measure(self, name: str, d: Path) -> dict[str, Any]:
        """Accuracy on --eval, size, params and a quick latency probe against the teacher."""

        s = self.s
        ev = evaluate_model_dir(d, s.eval, max_eval_samples=s.max_eval_samples, max_length=s.max_length)
        out = {"kind": model_kind(d), "params": count_stored_params(d), "size_mb": weights_size_mb(d),
               "accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"], "per_class": ev["per_class"]}
        # Probe: a few interleaved rounds with the teacher (threads as in the final bench).
        # Only steers the search; the reported latencies come from the final bench.

        set_threads(s.threads)
        if self._ref is None:
            p, tok = load_predict(s.model, s.threads)
            self._ref = (p, model_inputs(p, tok, s.bench_batch_size, s.bench_seq_len))
        p, tok = load_predict(d, s.threads)
        x = model_inputs(p, tok, s.bench_batch_size, s.bench_seq_len)
        ref_p, ref_x = self._ref
        lat = measure_latency({"teacher": lambda: ref_p(ref_x), name: lambda: p(x)}, repeats=8, warmup=2)
        out["latency_ms_probe"] = lat[name]["p50_ms"]
        out["teacher_ms_probe"] = lat["teacher"]["p50_ms"]
        self._restore_threads()
        return out

    # --- step makers -------------------------------------------------------------------------

    def quantized(self, parent: dict[str, Any], cfg: dict[str, Any], layers: int, ffn_keep: float,
                  vocab: int | None) -> None:
        """The int8 ONNX Runtime child of ``parent`` (embeddings included). No SQNR gate (and so
        no mixed-precision search): the candidate's accuracy is what the search judges."""

        if "int8" not in self.s.quant:
            return
        settings = {**parent["settings"], "quant": "int8-onnxruntime"}
        pred = predict_size_mb(cfg, layers=layers, ffn_keep=ffn_keep, vocab=vocab, int8=True)
        s = self.s

        def make(d: Path) -> None:
            run_quantize(QuantizeSettings(model=parent["path"], output=str(d), scheme="int8", backend="onnxruntime",
                                          threads=s.threads, batch_size=s.bench_batch_size, seq_len=s.bench_seq_len,
                                          repeats=5, min_sqnr_db=-1000.0, calib=s.train,
                                          calib_samples=64))

        self.build(parent["name"] + "-int8", parent["name"], settings, "quantize", make, pred)


def run_compress(s: CompressSettings, log: Any = None) -> dict[str, Any]:
    """Run the search; write ``best/``, ``candidates.json`` and the report; return a summary."""

    s.validate()
    if s.decoder:
        raise RecipeError(f"--model {s.model}: a causal LM; run slimtune.pipeline.search_decoder.run_decoder_compress "
                          f"(slimtune compress picks it)")
    s = s.resolved()
    S = Search(s, log)
    out = S.out
    atomic_write_json(out / "compress.json", dataclasses.asdict(s))
    save_settings(s, out / "compress.yaml")  # what `slimtune compress --config` reads back
    n_layers = int(S.teacher_cfg.get("num_hidden_layers", 0))
    cfg = S.teacher_cfg

    # 0. the teacher: the reference accuracy
    S.say(f"evaluating the input model on {s.eval}")
    t_eval = evaluate_model_dir(s.model, s.eval, max_eval_samples=s.max_eval_samples, max_length=s.max_length)

    S.min_accuracy = t_eval["accuracy"] - s.max_accuracy_drop / 100
    S.record("input", parent=None, settings={"student_layers": n_layers, "ffn_removed": 0.0, "vocab": "full",
                                             "quant": "none"}, status="ok", path=str(s.model), role="input",
             kind=model_kind(s.model), params=count_stored_params(s.model), size_mb=weights_size_mb(s.model),
             accuracy=t_eval["accuracy"], macro_f1=t_eval["macro_f1"], per_class=t_eval["per_class"])
    S.say(f"input accuracy {t_eval['accuracy']:.4f}; constraint: accuracy >= {S.min_accuracy:.4f}"
          + (f", size <= {s.max_size_mb} MB" if s.max_size_mb else "")
          + (f", p50 <= {s.max_latency_ms} ms" if s.max_latency_ms else ""))

    # 1. vocabulary (no training; exact on the corpus) and its int8 version: cheap, safe baselines
    base = S.cands["input"]
    vocab_n: int | None = None
    if s.vocab:

        def make_v(d: Path) -> None:
            run_prune(PruneSettings(model=s.model, output=str(d), vocab_from=[s.train], max_length=s.max_length,
                                    seed=s.seed))

        v = S.build("v", "input", {**base["settings"], "vocab": "train-corpus"}, "vocab", make_v)
        if v is not None:
            base = v
            vocab_n = json.loads((Path(v["path"]) / "config.json").read_text()).get("vocab_size")
    S.quantized(base, cfg, n_layers, 1.0, vocab_n)

    # 2. static-embedding students (seconds each): the fast end of the front
    _static_family(S, base, cfg, vocab_n)

    # 3. student depths by bisection; for each depth, int8 first, then FFN ratios mild -> strong
    depths = sorted({d for d in s.depths if d < n_layers})
    lo, hi = 0, len(depths) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        d = depths[mid]
        ok = _try_depth(S, base, cfg, d, vocab_n)
        if ok:
            hi = mid - 1  # feasible: try shallower students
        else:
            lo = mid + 1  # infeasible: deeper
        if S.remaining() < 60:
            break
    if n_layers in s.depths or not depths:  # FFN pruning of the full-depth model, if asked
        _ffn_ladder(S, base, cfg, n_layers, vocab_n)

    return finish(S, t_eval)


def _static_family(S: Search, base: dict[str, Any], cfg: dict[str, Any], vocab_n: int | None) -> None:
    """``S{d}``: static-embedding students of ``base`` (the vocabulary-pruned model when there is
    one), widest first, each trained on the teacher's soft labels over the training text
    (:func:`slimtune.compress.distill.static.run_static`); ``S{d}-int8``: the same table stored
    as int8 rows (no training). Every width is tried (seconds each); misses stay candidates."""

    s = S.s
    hidden = int(cfg.get("hidden_size", 384))
    vocab = vocab_n or int(cfg.get("vocab_size", 30522))
    labels = len(cfg.get("id2label") or {}) or 2
    for d in sorted({min(x, hidden) for x in s.static_dims}, reverse=True):
        name = f"S{d}"
        settings = {**base["settings"], "student_layers": 0, "static": {"dims": d, "epochs": s.static_epochs,
                                                                        "rows": s.max_train_samples, "alpha": s.alpha,
                                                                        "T": s.temperature}, "quant": "float16"}

        def make(out: Path, d: int = d) -> None:
            run_static(StaticSettings(model=base["path"], train=s.train, output=str(out), dims=d, storage="float16",
                                      epochs=s.static_epochs, batch_size=s.batch_size, alpha=s.alpha,
                                      temperature=s.temperature, max_length=s.max_length,
                                      max_train_samples=s.max_train_samples, seed=s.seed))

        fp16_mb = (vocab * d * 2 + labels * d * 4) / 1e6
        c = S.build(name, base["name"], settings, "static", make, fp16_mb if "none" in s.quant else None)
        if c is None or "int8" not in s.quant:
            continue
        S.build(name + "-int8", name, {**settings, "quant": "int8-rows"}, "static-int8",
                lambda out, src=c["path"]: restore_static(src, out, "int8"), (vocab * d + labels * d * 4) / 1e6)


def _try_depth(S: Search, base: dict[str, Any], cfg: dict[str, Any], d: int, vocab_n: int | None) -> bool:
    """Distil a d-layer student and its compressed children; True if any of them is feasible."""
    s = S.s
    smallest = predict_size_mb(cfg, layers=d, ffn_keep=1 - max(s.ffn or [0.0]), vocab=vocab_n,
                               int8="int8" in s.quant)
    if s.max_size_mb is not None and smallest > 1.05 * s.max_size_mb:
        S.record(f"L{d}", parent=base["name"], settings={**base["settings"], "student_layers": d},
                 status="skipped", reason=f"even the smallest child is predicted at {smallest:.1f} MB > "
                                          f"--max-size-mb {s.max_size_mb}")
        S.say(f"L{d}: skipped ({S.cands[f'L{d}']['reason']})")
        return False

    def make_student(out: Path) -> None:

        tree = {"output": str(out), "model": {"name": base["path"]},
                "data": {"train": s.train, "eval": s.eval, "max_length": s.max_length,
                         "max_train_samples": s.max_train_samples, "max_eval_samples": s.max_eval_samples},
                "train": {"epochs": s.epochs, "lr": s.lr, "batch_size": s.batch_size, "seed": s.seed,  # lr None: method default
                          "tensorboard": False, "progress": False, "resume": False, "log_every": 10},
                "method": {"name": "full"}}
        recipe = resolve(tree, "compress")
        dcfg = DistillConfig(student_layers=d, alpha=s.alpha, temperature=s.temperature)
        dcfg.validate(recipe)
        run_distill(recipe, dcfg)

    if "distill" in S.costs and not S.fits("distill", d / S.last_depth):  # cost ~ student depth
        S.record(f"L{d}", parent=base["name"], settings={**base["settings"], "student_layers": d},
                 status="skipped", reason=f"time budget: {S.remaining():.0f} s left")
        S.say(f"L{d}: skipped (time budget)")
        return False
    student = S.build(f"L{d}", base["name"], {**base["settings"], "student_layers": d,
                                              "distill": {"epochs": s.epochs, "rows": s.max_train_samples,
                                                          "alpha": s.alpha, "T": s.temperature}},
                      "distill", make_student, predict_size_mb(cfg, layers=d, vocab=vocab_n) if "none" in s.quant else None)
    S.last_depth = d
    if student is None:
        return False
    S.quantized(student, cfg, d, 1.0, vocab_n)
    if student["accuracy"] < S.min_accuracy:
        S.say(f"L{d}: below the accuracy floor before FFN pruning; its FFN variants are skipped")
        return False
    _ffn_ladder(S, student, cfg, d, vocab_n)
    return any(S.feasible(c) for c in S.cands.values()
               if c.get("settings", {}).get("student_layers") == d)


def _ffn_ladder(S: Search, parent: dict[str, Any], cfg: dict[str, Any], d: int, vocab_n: int | None) -> None:
    """FFN pruning with KD recovery, mild ratios first; stop at the first accuracy miss."""

    s = S.s
    for f in sorted(s.ffn):
        name = f"{parent['name'] if parent['name'] != 'input' else 'L' + str(d)}-ffn{round(f * 100)}"
        settings = {**parent["settings"], "ffn_removed": f, "recover_steps": s.recover_steps}

        def make(out: Path, f: float = f) -> None:
            run_prune(PruneSettings(model=parent["path"], output=str(out), train=s.train, ffn=f,
                                    recover_steps=s.recover_steps, kd=True, lr=s.lr, batch_size=s.batch_size,
                                    max_length=s.max_length, max_train_samples=s.max_train_samples, seed=s.seed))

        # the smallest thing this step leads to: its int8 child if asked for, else itself
        pred = predict_size_mb(cfg, layers=d, ffn_keep=1 - f, vocab=vocab_n,
                               int8="int8" in s.quant and "none" not in s.quant)
        c = S.build(name, parent["name"], settings, "ffn", make, pred)
        if c is None:
            continue
        S.quantized(c, cfg, d, 1 - f, vocab_n)
        if c["accuracy"] < S.min_accuracy:
            break


# --------------------------------------------------------------------------------------------
# Final bench, choice, outputs
# --------------------------------------------------------------------------------------------


def _score(c: dict[str, Any], ref: dict[str, Any], prefer: str) -> tuple[float, ...]:
    size = c["size_mb"] / ref["size_mb"]
    lat = c["latency_ms_p50"] / ref["latency_ms_p50"]
    if prefer == "size":
        return (size, lat)
    if prefer == "latency":
        return (lat, size)
    return (size * lat, lat)


def finish(S: Search, t_eval: dict[str, Any]) -> dict[str, Any]:
    """Bench every candidate and the input side by side; choose; write best/, JSON and report."""
    return finish_with(S, t_eval, _final_bench)


def finish_with(S: Search, t_eval: dict[str, Any], bench: Any, *, constraint: str | None = None,
                latency: str | None = None) -> dict[str, Any]:
    """:func:`finish` with another side-by-side ``bench(S) -> (built candidates, results with "hardware")``
    (the decoder search times decoding) and, for the report, other constraint and latency sentences."""

    ok, res = bench(S)
    _mark_front(S, ok)
    best, verdict_ok, verdict = _choose(S, ok)
    for c in S.cands.values():
        c["best"] = c is best
    S.save()
    _write_best(S, best, verdict_ok, res)
    paths = _write_report(S, ok, best, verdict, verdict_ok, t_eval, constraint=constraint, latency=latency)
    summary = {"verdict": verdict, "meets_constraints": verdict_ok, "best": best["name"],
               "min_accuracy": S.min_accuracy, "report": str(paths["html"]),
               "candidates": list(S.cands.values())}
    atomic_write_json(S.out / "summary.json", {k: v for k, v in summary.items() if k != "candidates"})
    return summary


def _final_bench(S: Search) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time every built candidate (earlier runs' too) and the input in ONE interleaved run; add
    the final latencies (and ``--test`` accuracy) to each. Returns (the built candidates, the bench)."""

    s = S.s
    # Candidates an earlier run built in this folder (same evaluation data) stay in the comparison.
    for marker in sorted(S.cand_dir.glob("*/candidate.json")):
        old = json.loads(marker.read_text())
        if old.get("status") == "ok" and old.get("eval_key") == S.eval_key and \
                S.cands.get(old["name"], {}).get("status") != "ok":
            S.cands[old["name"]] = {**old, "reason": None, "from_earlier_run": True}
    ok = [c for c in S.cands.values() if c.get("status") == "ok"]
    S.say(f"final side-by-side bench of {len(ok)} models (threads {s.threads}, batch {s.bench_batch_size}, "
          f"seq {s.bench_seq_len}, {s.bench_repeats} interleaved rounds)")
    res = bench_models({c["name"]: c["path"] for c in ok}, batch_sizes=[s.bench_batch_size],
                       seq_lens=[s.bench_seq_len], threads=[s.threads], repeats=s.bench_repeats, warmup=3)
    S._restore_threads()
    for c in ok:
        m = latency_at(res["models"][c["name"]], s.threads, s.bench_batch_size, s.bench_seq_len)
        c.update(latency_ms_p50=m["p50_ms"], latency_ms_p95=m["p95_ms"],
                 load_rss_mb=res["models"][c["name"]].get("load_rss_mb"))
        if s.test:
            te = evaluate_model_dir(c["path"], s.test, max_length=s.max_length)
            c["test_accuracy"], c["test_macro_f1"] = te["accuracy"], te["macro_f1"]
    return ok, res


def _mark_front(S: Search, ok: list[dict[str, Any]]) -> None:
    """``on_pareto_front`` (accuracy vs latency vs size) and ``meets_constraints`` (final latencies)."""
    front = pareto_front(ok, ("latency_ms_p50", "size_mb"))
    for c in S.cands.values():
        c["on_pareto_front"] = False
        c["meets_constraints"] = S.feasible(c, use_final=True)
    for c, f in zip(ok, front, strict=True):
        c["on_pareto_front"] = f


def _size_latency_text(s: CompressSettings, sep: str) -> str:
    """``", size <= 9.08 MB, p50 <= 10 ms"``: the size and latency constraints that are set."""
    return ((f"{sep}size <= {s.max_size_mb} MB" if s.max_size_mb else "")
            + (f"{sep}p50 <= {s.max_latency_ms} ms" if s.max_latency_ms else ""))


def _choose(S: Search, ok: list[dict[str, Any]]) -> tuple[dict[str, Any], bool, str]:
    """(best candidate, whether it meets every constraint, the verdict sentence)."""

    s, ref = S.s, S.cands["input"]
    feasible = [c for c in ok if c["meets_constraints"]]
    if feasible:
        best = min(feasible, key=lambda c: _score(c, ref, s.prefer))
        verdict_ok = True
        verdict = (f"{best['name']} meets every constraint: accuracy {best['accuracy']:.4f} (>= {S.min_accuracy:.4f}), "
                   f"{ref['size_mb'] / best['size_mb']:.1f}x smaller ({best['size_mb']:.2f} MB), "
                   f"{ref['latency_ms_p50'] / best['latency_ms_p50']:.1f}x faster ({best['latency_ms_p50']:.2f} ms p50)")
    else:
        # No candidate meets everything: keep all, and put the closest miss in best/.
        def violation(c: dict[str, Any]) -> float:
            v = max(0.0, S.min_accuracy - c["accuracy"]) * 100
            if s.max_size_mb:
                v += max(0.0, c["size_mb"] / s.max_size_mb - 1) * 10
            if s.max_latency_ms:
                v += max(0.0, c["latency_ms_p50"] / s.max_latency_ms - 1) * 10
            return v

        best = min(ok, key=lambda c: (violation(c), _score(c, ref, s.prefer)))
        verdict_ok = False
        verdict = (f"NO candidate meets the constraints (accuracy >= {S.min_accuracy:.4f}{_size_latency_text(s, ', ')}). "
                   f"All {len(ok)} candidates are kept in candidates/; best/ holds the closest: "
                   f"{best['name']} (accuracy {best['accuracy']:.4f}, {best['size_mb']:.2f} MB, "
                   f"{best['latency_ms_p50']:.2f} ms). Try a larger --budget-minutes, --max-train-samples or "
                   f"--depths with more layers.")
    if s.test and best.get("test_accuracy") is not None and ref.get("test_accuracy"):
        verdict += (f"; on the held-out {Path(s.test).name} (never used to choose): {best['test_accuracy']:.4f} vs "
                    f"{ref['test_accuracy']:.4f}, {best['test_accuracy'] / ref['test_accuracy']:.2%} of the input")
    return best, verdict_ok, verdict


def _write_report(S: Search, ok: list[dict[str, Any]], best: dict[str, Any], verdict: str, verdict_ok: bool,
                  t_eval: dict[str, Any], *, constraint: str | None = None, latency: str | None = None) -> dict[str, Path]:
    """``OUT/report.{html,md,json}``: every built candidate, the constraint, the search and the hardware."""

    s = S.s
    rows = [{**c, "settings": c.get("settings"), "metrics_jsonl": str(Path(c["path"]) / "metrics.jsonl")}
            for c in ok]
    meta = {"constraint": (constraint or f"accuracy >= {S.min_accuracy:.4f} on {s.eval} (input {t_eval['accuracy']:.4f} "
                                         f"- {s.max_accuracy_drop} pt)") + _size_latency_text(s, '; '),
            "latency setting": latency or (f"threads {s.threads}, batch {s.bench_batch_size}, seq {s.bench_seq_len}, "
                                           f"{s.bench_repeats} interleaved rounds, one run"),
            "search": f"{len(S.cands)} candidates ({len(ok)} built), {(time.monotonic() - S.t0) / 60:.1f} min of "
                      f"{s.budget_minutes} min budget",
            "skipped": {c["name"]: c["reason"] for c in S.cands.values() if c.get("status") != "ok"} or "none",
            "hardware": hardware_fingerprint()}
    return write_report(S.out, rows, title=f"slimtune compress: {Path(s.model).name}", teacher="input",
                        best=best["name"], verdict=verdict, verdict_ok=verdict_ok,
                        min_accuracy=S.min_accuracy, meta=meta)


def _write_best(S: Search, best: dict[str, Any], ok: bool, res: dict[str, Any]) -> None:

    ref = S.cands["input"]
    with atomic_dir(S.out / "best") as tmp:
        for p in Path(best["path"]).iterdir():
            if p.is_file() and p.name not in ("candidate.json", "metrics.jsonl"):
                shutil.copy2(p, tmp / p.name)
        keys = ("accuracy", "macro_f1", "per_class", "test_accuracy", "test_macro_f1", "size_mb", "params",
                "latency_ms_p50", "latency_ms_p95", "kind", "settings")
        atomic_write_json(tmp / "metrics.json", {
            **{k: best.get(k) for k in keys}, "candidate": best["name"], "meets_constraints": ok,
            "min_accuracy": S.min_accuracy, "eval_file": S.s.eval, "test_file": S.s.test,
            "input": {k: ref.get(k) for k in ("accuracy", "test_accuracy", "size_mb", "latency_ms_p50", "path")},
            "x_smaller": ref["size_mb"] / best["size_mb"], "x_faster": ref["latency_ms_p50"] / best["latency_ms_p50"],
            "latency_setting": {"threads": S.s.threads, "batch_size": S.s.bench_batch_size,
                                "seq_len": S.s.bench_seq_len},
            "hardware": res["hardware"]})


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------








