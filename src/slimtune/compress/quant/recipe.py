"""``slimtune quantize``: quantize a fine-tuned classifier and prove what it cost and gained.

Public API (torchao-style; the pieces live in ``slimtune/quant/``)::

    from slimtune.compress.quant.recipe import quantize_, Int4WeightConfig, save_quantized, load_quantized
    quantize_(model, Int4WeightConfig(group_size=32))      # in place
    save_quantized(model, "out/", Int4WeightConfig(group_size=32), tokenizer)
    model = load_quantized("out/")                         # identical codes and outputs

    run_quantize(QuantizeSettings(model="model_dir", scheme="int8", output="out/", eval="test.tsv"))  # the CLI
    clf = load_classifier("out/")     # any slimtune output: clf(input_ids, attention_mask, token_type_ids) -> logits

Schemes: ``int8`` (weights + dynamic int8 activations on the fastest CPU backend, chosen by
measurement), ``int4`` (packed, group-wise), ``nf4``, ``kmeans`` (weight-only storage formats,
decoded to float at load), ``fp32`` (no quantization; with ``--backend onnxruntime`` the fused
fp32 ONNX folder). Every run writes ``metrics.json`` (accuracy, size, SQNR, latency, backend and
why, the config and gates applied) and ``quantize.yaml`` (its settings: ``--config`` repeats the run).
"""

from __future__ import annotations

import copy
import importlib
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtune.benchmark.timing import hardware_fingerprint, sample_inputs, set_threads
from slimtune.compress.quant import backends as B
from slimtune.compress.quant.api import config_to_dict, dequantize_, quantize_
from slimtune.compress.quant.decoder import format_decoder_summary, run_decoder_quantize
from slimtune.compress.quant.linear import sqnr_db
from slimtune.compress.quant.onnx import write_onnx_folder
from slimtune.compress.quant.qat import recover_
from slimtune.compress.quant.settings import (  # noqa: F401 (SCHEMES ... make_config: re-exported, the run API)
    BACKEND_CHOICES,
    SCHEMES,
    QuantizeError,
    QuantizeSettings,
    make_config,
)
from slimtune.compress.quant.storage import export_dequantized as write_dequantized
from slimtune.compress.quant.storage import load_quantized, save_quantized
from slimtune.config.fields import save_settings
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.models.loading import label_names_of, load_model, load_tokenizer
from slimtune.runtime.predict import predict_all, torch_predict

SETTINGS_FILE = "quantize.yaml"  # the resolved settings, beside the artifacts; `--config` reads it back

_API = {
    "quantize_": "slimtune.compress.quant.api", "dequantize_": "slimtune.compress.quant.api",
    "register_quantize_handler": "slimtune.compress.quant.api", "Int8WeightConfig": "slimtune.compress.quant.api",
    "Int4WeightConfig": "slimtune.compress.quant.api", "NF4Config": "slimtune.compress.quant.api",
    "KMeansConfig": "slimtune.compress.quant.api", "QuantizedLinear": "slimtune.compress.quant.api",
    "QuantizedEmbedding": "slimtune.compress.quant.api", "save_quantized": "slimtune.compress.quant.storage",
    "load_quantized": "slimtune.compress.quant.storage", "export_dequantized": "slimtune.compress.quant.storage",
    "load_onnx_classifier": "slimtune.compress.quant.onnx", "write_onnx_folder": "slimtune.compress.quant.onnx",
    "sqnr_db": "slimtune.compress.quant.linear",
}


def __getattr__(name: str) -> Any:
    # Lazy re-exports: `from slimtune.compress.quant.recipe import quantize_` works without importing torch
    # when only the CLI parser is built.
    if name in _API:

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'slimtune.compress.quant.recipe' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _eval_setup(model_dir: Path, eval_path: str | None, tokenizer: Any, label_names: list[str],
                max_eval_samples: int | None, max_length: int | None) -> Any:
    """``eval_path`` read with the columns/encoding of the model's ``recipe.yaml`` and tokenized."""
    if eval_path is None:
        return None
    d: dict[str, Any] = {}
    if (model_dir / "recipe.yaml").is_file():
        d = (yaml.safe_load((model_dir / "recipe.yaml").read_text()) or {}).get("data", {}) or {}
    data = load_classification(eval_path, text_column=d.get("text_column"),
                               text_pair_column=d.get("text_pair_column"), label_column=d.get("label_column"),
                               label_names=label_names, encoding=d.get("encoding") or "utf-8",
                               max_rows=max_eval_samples)
    return tokenize_classification(data, tokenizer, max_length or d.get("max_length") or 128)


def _copy_into(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file():
            shutil.copy2(p, dst / p.name)


@dataclass
class _Reference:
    """The fp32 model and what every candidate is compared with (logits on --eval and on the
    latency input)."""

    src: Path
    tok: Any
    model: Any
    names: list[str]
    data: Any
    inputs: dict[str, Any]
    predict: Any
    ref: Any
    ref_sample: Any
    fp32: dict[str, Any]


def run_quantize(s: QuantizeSettings) -> dict[str, Any]:
    """Quantize the classifier ``s.model`` and write ``s.output`` with ``metrics.json``.

    Every setting is validated before any weight loads; the output folder (weights,
    ``metrics.json``, ``quantize.yaml`` = ``s``) is written in one atomic step, and not at all
    when a parity gate (``s.gates()``) fails.

    Args:
        s: The settings (see :class:`QuantizeSettings`; ``slimtune quantize --help`` lists them).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        QuantizeError: bad settings, or the result misses ``--min-sqnr`` / ``--max-accuracy-drop``
            (the message gives the measured value and the gate).
    """
    s.validate()
    if s.is_decoder():
        return run_decoder_quantize(s)
    cfg = s.weight_config()
    gates = s.gates()
    set_threads(s.threads)
    r = _setup_reference(s)
    metrics: dict[str, Any] = {"model": str(r.src), "scheme": s.scheme,
                               "config": config_to_dict(cfg) if cfg is not None else None, "gates": gates,
                               "eval_file": s.eval, "eval_n": len(r.data) if r.data else 0,
                               "latency_setting": {"batch_size": s.batch_size, "seq_len": s.seq_len,
                                                   "threads": s.threads}}
    out = Path(s.output)
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as work:
        if s.scheme in ("int8", "fp32"):
            _step_backends(s, r, cfg, gates, Path(work), tmp, metrics)
        else:
            _step_weight_only(s, r, cfg, Path(work), tmp, metrics)
            _check_gates(s, gates, metrics, r.fp32)
        _step_finish(s, r, tmp, metrics)
    return metrics


def _setup_reference(s: QuantizeSettings) -> _Reference:
    """Load the fp32 model, the eval data and the latency input; compute the reference logits."""
    src = Path(s.model)
    tok = load_tokenizer(str(src))
    model = load_model(str(src), "classification").eval()
    names = label_names_of(model)
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    data = _eval_setup(src, s.eval, tok, names, s.max_eval_samples, s.max_length)
    inputs = sample_inputs(tok, s.batch_size, s.seq_len)
    if "token_type_ids" not in inputs or getattr(model.config, "type_vocab_size", 0) <= 1:
        inputs.pop("token_type_ids", None)
    predict = torch_predict(model)
    ref = predict_all(predict, data) if data is not None else None
    fp32 = {"size_mb": weights_size_mb(src), "accuracy": B.accuracy(ref, data.labels) if data else None}
    return _Reference(src, tok, model, names, data, inputs, predict, ref, predict(inputs).float(), fp32)


def _candidates(s: QuantizeSettings, r: _Reference, cfg: Any, gates: dict[str, Any], work: Path,
                metrics: dict[str, Any]) -> tuple[list[B.Candidate], dict[str, str]]:
    """The fp32 ONNX folder (fp32), or every int8 backend that can run ``cfg`` (with why the others cannot)."""
    if s.scheme == "fp32":
        path = work / "onnx-fp32"
        info = write_onnx_folder(r.model, path, r.tok, optimize=True, quantize=False)
        return [B.Candidate("onnxruntime-fp32-fused", "onnxruntime", B.onnx_predict(path), path, info)], {}
    wanted = s.int8_backends()
    skipped = {b: f"cannot run these settings: {B.int8_backend_gap(b, cfg)}"
               for b in (B.BACKENDS if s.backend == "auto" else [s.backend]) if b not in wanted}
    calib_file = s.calib or s.train or s.eval
    calib = _eval_setup(r.src, calib_file, r.tok, r.names, s.calib_samples, s.max_length) if calib_file else None
    metrics["calib_file"] = calib_file
    cands, failed = B.build_candidates(r.model, r.tok, work, wanted, calib=calib,
                                       target_db=gates["min_sqnr_db"] + 0.5, cfg=cfg)
    return cands, {**skipped, **failed}


def _step_backends(s: QuantizeSettings, r: _Reference, cfg: Any, gates: dict[str, Any], work: Path,
                   tmp: Path, metrics: dict[str, Any]) -> None:
    """int8 / fp32: build the candidates, time and score them, copy the fastest with parity to ``tmp``."""
    cands, failed = _candidates(s, r, cfg, gates, work, metrics)
    # Time first: a candidate the pre-screen drops (torchao eager: ~25x fp32) is not
    # worth a pass over the eval set.
    lat, dropped = B.time_candidates({"fp32": r.predict, **{c.name: c.predict for c in cands}},
                                     r.inputs, repeats=s.repeats)
    for c in cands:
        if c.name in lat:
            c.metrics["latency_ms_p50"] = lat[c.name]["p50_ms"]
            c.metrics["latency_ms_p95"] = lat[c.name]["p95_ms"]
        else:
            c.metrics["dropped"] = dropped[c.name]
        c.metrics["sqnr_db_sample"] = sqnr_db(r.ref_sample, c.predict(r.inputs).float())
        c.metrics["size_mb"] = weights_size_mb(c.path) if c.path else None
    timed = [c for c in cands if c.name in lat]
    if r.data is not None:
        B.score_parity(timed, r.ref, r.data)
    for c in cands:  # without --eval, SQNR on the latency input is the parity measure
        c.metrics.setdefault("sqnr_db", c.metrics["sqnr_db_sample"])
    r.fp32["latency_ms_p50"] = lat["fp32"]["p50_ms"]
    savable = [c for c in cands if c.path is not None]
    drop = gates["max_accuracy_drop"]
    chosen, why = B.choose(savable, r.fp32["accuracy"] if drop is not None else None,
                           min_sqnr_db=gates["min_sqnr_db"], max_accuracy_drop=drop if drop is not None else math.inf)
    if chosen is None:
        raise QuantizeError(f"{r.src}: {why}. Lower --min-sqnr / raise --max-accuracy-drop, "
                            f"or try another --backend; nothing written")
    _copy_into(chosen.path, tmp)
    metrics["candidates"] = {c.name: {"backend": c.backend, **c.metrics, "info": c.info} for c in cands}
    metrics["failed_backends"] = failed
    metrics.update(backend=chosen.backend, backend_candidate=chosen.name, backend_reason=why,
                   sqnr_db=chosen.metrics["sqnr_db"], accuracy=chosen.metrics.get("accuracy"),
                   latency_ms_p50=chosen.metrics["latency_ms_p50"])


def _step_weight_only(s: QuantizeSettings, r: _Reference, cfg: Any, work: Path, tmp: Path,
                      metrics: dict[str, Any]) -> None:
    """int4 / nf4 / kmeans: quantize (after the optional QAT recovery), save, prove the reload exact, measure."""
    q = quantize_(copy.deepcopy(r.model), cfg)
    if s.qat_steps:
        metrics["qat"] = _recover(r.model, q, cfg, r.src, r.tok, r.names, r.data, s.train, s.qat_steps,
                                  s.qat_lr, s.qat_batch_size, s.max_length, work)
        q = quantize_(metrics["qat"].pop("model"), cfg)
    save_quantized(q, tmp, cfg, r.tok)
    # Exactness: what a reload gives must equal the in-memory quantized model.
    reloaded = load_quantized(tmp)
    with torch.inference_mode():
        same = torch.equal(q(**r.inputs).logits, reloaded(**r.inputs).logits)
    if not same:
        raise RuntimeError(f"{tmp}: reloaded quantized model differs from the one saved")
    served = dequantize_(reloaded)  # decoded once at load: fp32 kernels, compact on disk
    served_predict = torch_predict(served)
    lat, _ = B.time_candidates({"fp32": r.predict, "served": served_predict}, r.inputs,
                               repeats=s.repeats, prescreen_ratio=1e9)
    r.fp32["latency_ms_p50"] = lat["fp32"]["p50_ms"]
    lg = predict_all(served_predict, r.data) if r.data is not None else None
    metrics.update(backend="torch (decoded to fp32 at load)", backend_reason=(
        f"{s.scheme} is a weight-only storage format: codes are decoded once at load and run "
        f"with fp32 kernels"), roundtrip_exact=same,
        sqnr_db=sqnr_db(r.ref, lg) if lg is not None else sqnr_db(r.ref_sample, served_predict(r.inputs)),
        accuracy=B.accuracy(lg, r.data.labels) if r.data is not None else None,
        latency_ms_p50=lat["served"]["p50_ms"])
    if s.export_dequantized:
        write_dequantized(reloaded, tmp / "dequantized", r.tok)


def _check_gates(s: QuantizeSettings, gates: dict[str, Any], metrics: dict[str, Any], fp32: dict[str, Any]) -> None:
    """Raise (so nothing is written) when the result misses a gate, with the measured value."""
    where = f"on {s.eval}" if s.eval else "on the latency input (no --eval)"
    if gates["min_sqnr_db"] is not None and metrics["sqnr_db"] < gates["min_sqnr_db"]:
        raise QuantizeError(f"--scheme {s.scheme}: logits SQNR {metrics['sqnr_db']:.1f} dB {where} < --min-sqnr "
                            f"{gates['min_sqnr_db']:g} dB; nothing written (finer --granularity / --group-size, "
                            f"--qat-steps, or a lower --min-sqnr)")
    if gates["max_accuracy_drop"] is not None and metrics.get("accuracy") is not None:
        drop = (fp32["accuracy"] - metrics["accuracy"]) * 100
        if drop > gates["max_accuracy_drop"]:
            raise QuantizeError(f"--scheme {s.scheme}: accuracy drop {drop:.2f} pt on {s.eval} > --max-accuracy-drop "
                                f"{gates['max_accuracy_drop']:g} pt (fp32 {fp32['accuracy']:.4f}, "
                                f"{s.scheme} {metrics['accuracy']:.4f}); nothing written")


def _step_finish(s: QuantizeSettings, r: _Reference, tmp: Path, metrics: dict[str, Any]) -> None:
    """Sizes and ratios; ``recipe.yaml`` of the input, ``metrics.json`` and ``quantize.yaml`` into ``tmp``."""
    fp32 = r.fp32
    metrics["size_mb"] = weights_size_mb(tmp)
    metrics["fp32"] = fp32
    metrics["compression"] = fp32["size_mb"] / max(metrics["size_mb"], 1e-9)
    metrics["speedup"] = fp32["latency_ms_p50"] / metrics["latency_ms_p50"]
    if metrics.get("accuracy") is not None and fp32["accuracy"] is not None:
        metrics["accuracy_drop_pt"] = (fp32["accuracy"] - metrics["accuracy"]) * 100
    metrics["hardware"] = hardware_fingerprint()
    if (r.src / "recipe.yaml").is_file():
        shutil.copy2(r.src / "recipe.yaml", tmp / "recipe.yaml")
    atomic_write_json(tmp / "metrics.json", metrics)
    save_settings(replace(s, overwrite=False), tmp / SETTINGS_FILE)  # a repeat from quantize.yaml asks again


def _recover(model: Any, ptq: Any, cfg: Any, src: Path, tok: Any, names: list[str], data: Any,
             train_path: str, steps: int, lr: float, batch_size: int, max_length: int | None,
             work: Path) -> dict[str, Any]:
    """Run the fake-quant recovery fine-tune on a copy of ``model``; report PTQ vs QAT accuracy."""

    train = _eval_setup(src, train_path, tok, names, steps * batch_size, max_length)
    t0 = time.perf_counter()
    recovered = copy.deepcopy(model)
    summary = recover_(recovered, cfg, train, steps=steps, lr=lr, batch_size=batch_size, work_dir=work)
    out: dict[str, Any] = {"steps": summary["steps"], "lr": lr, "batch_size": batch_size,
                           "train_file": train_path, "seconds": round(time.perf_counter() - t0, 1),
                           "model": recovered}
    if data is not None:
        out["ptq_accuracy"] = B.accuracy(predict_all(torch_predict(ptq), data), data.labels)
    return out


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def format_summary(m: dict[str, Any]) -> str:
    """A short human summary of a run's metrics."""
    if m.get("task") == "causal-lm":
        return format_decoder_summary(m)
    f = m["fp32"]
    acc = (f"accuracy {m['accuracy']:.4f} (fp32 {f['accuracy']:.4f}, drop {m['accuracy_drop_pt']:+.2f} pt)"
           if m.get("accuracy") is not None else "accuracy n/a (no --eval)")
    return "\n".join([
        f"scheme {m['scheme']}  backend {m.get('backend_candidate', m['backend'])}",
        f"size {m['size_mb']:.1f} MB (fp32 {f['size_mb']:.1f} MB, {m['compression']:.2f}x smaller)",
        f"latency p50 {m['latency_ms_p50']:.1f} ms (fp32 {f['latency_ms_p50']:.1f} ms, {m['speedup']:.2f}x)"
        f"  [bs {m['latency_setting']['batch_size']}, seq {m['latency_setting']['seq_len']}, "
        f"{m['latency_setting']['threads']} thread(s)]",
        f"logits SQNR {m['sqnr_db']:.1f} dB  {acc}",
        *([f"QAT recovery: {m['qat']['steps']} steps in {m['qat']['seconds']} s"
           + (f" (post-training accuracy was {m['qat']['ptq_accuracy']:.4f})" if "ptq_accuracy" in m['qat'] else "")]
          if m.get("qat") else []),
        f"why: {m['backend_reason']}"])
