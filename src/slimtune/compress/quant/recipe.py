"""``slimtune quantize``: quantize a fine-tuned classifier and prove what it cost and gained.

Public API (torchao-style; the pieces live in ``slimtune/quant/``)::

    from slimtune.compress.quant.recipe import quantize_, Int4WeightConfig, save_quantized, load_quantized
    quantize_(model, Int4WeightConfig(group_size=32))      # in place
    save_quantized(model, "out/", Int4WeightConfig(group_size=32), tokenizer)
    model = load_quantized("out/")                         # identical codes and outputs

    run_quantize("model_dir", "int8", output="out/", eval_path="test.tsv")   # what the CLI does
    clf = load_classifier("out/")     # any slimtune output: clf(input_ids, attention_mask, token_type_ids) -> logits

Schemes: ``int8`` (weights + dynamic int8 activations on the fastest CPU backend, chosen by
measurement), ``int4`` (packed, group-wise), ``nf4``, ``kmeans`` (weight-only storage formats,
decoded to float at load), ``fp32`` (no quantization; with ``--backend onnxruntime`` the fused
fp32 ONNX folder). Every run writes ``metrics.json``: accuracy, size, SQNR, latency, backend and why.

Top-level imports are stdlib only (the CLI parser imports this module).
"""

from __future__ import annotations

import copy
import importlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtune.benchmark.timing import hardware_fingerprint, sample_inputs, set_threads
from slimtune.compress.quant import backends as B
from slimtune.compress.quant.api import (
    Int4WeightConfig,
    Int8WeightConfig,
    KMeansConfig,
    NF4Config,
    config_to_dict,
    dequantize_,
    quantize_,
)
from slimtune.compress.quant.linear import sqnr_db
from slimtune.compress.quant.onnx import write_onnx_folder
from slimtune.compress.quant.qat import recover_
from slimtune.compress.quant.storage import export_dequantized as write_dequantized
from slimtune.compress.quant.storage import load_quantized, save_quantized
from slimtune.data.datasets import load_classification, tokenize_classification
from slimtune.io import atomic_dir, atomic_write_json, weights_size_mb
from slimtune.models.loading import ModelError, label_names_of, load_model, load_tokenizer
from slimtune.runtime.predict import predict_all, torch_predict

SCHEMES = ("int8", "int4", "nf4", "kmeans", "fp32")
BACKEND_CHOICES = ("auto", "torch", "torchao", "onnxruntime")

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


class QuantizeError(ValueError):
    """Bad arguments or inputs to ``slimtune quantize`` (reported as one line)."""


def make_config(scheme: str, *, granularity: str | None = None, group_size: int | None = None,
                bits: int | None = None, symmetric: bool | None = None,
                include_embeddings: bool = True) -> Any:
    """The config object for a scheme and CLI-style options, validated with clear errors."""

    if scheme not in SCHEMES:
        raise QuantizeError(f"--scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if group_size is not None and group_size < 2:
        raise QuantizeError(f"--group-size must be >= 2, got {group_size}")
    kw: dict[str, Any] = {"include_embeddings": include_embeddings}
    if scheme in ("int8", "int4"):
        want = 8 if scheme == "int8" else 4
        if bits is not None and bits != want:
            raise QuantizeError(f"--bits {bits} contradicts --scheme {scheme} ({want} bits); --bits is for kmeans")
        if granularity is not None:
            kw["granularity"] = granularity
        if group_size is not None:
            if (granularity or ("channel" if scheme == "int8" else "group")) != "group":
                raise QuantizeError("--group-size needs --granularity group")
            kw["group_size"] = group_size
        if symmetric is not None:
            kw["symmetric"] = symmetric
        cls = Int8WeightConfig if scheme == "int8" else Int4WeightConfig
    elif scheme == "nf4":
        if granularity not in (None, "group"):
            raise QuantizeError(f"nf4 is block-wise (use --group-size for the block size), not {granularity!r}")
        if bits not in (None, 4):
            raise QuantizeError(f"nf4 is a 4-bit code; --bits {bits} is not possible")
        if symmetric is not None:
            raise QuantizeError("--symmetric/--asymmetric do not apply to nf4")
        if group_size is not None:
            kw["block_size"] = group_size
        cls = NF4Config
    elif scheme == "kmeans":
        if granularity == "group" or group_size is not None:
            raise QuantizeError("kmeans codebooks are per tensor or per channel; --granularity group / --group-size do not apply")
        if bits is not None:
            kw["bits"] = bits
        if granularity is not None:
            kw["granularity"] = granularity
        if symmetric is not None:
            raise QuantizeError("--symmetric/--asymmetric do not apply to kmeans")
        cls = KMeansConfig
    else:  # fp32
        return None
    try:
        return cls(**kw)
    except ValueError as e:
        raise QuantizeError(f"--scheme {scheme}: {e}") from None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _eval_setup(model_dir: Path, eval_path: str | None, tokenizer: Any, label_names: list[str],
                max_eval_samples: int | None, max_length: int | None) -> Any:

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


def run_quantize(model_dir: str, scheme: str, output: str, *, eval_path: str | None = None,
                 granularity: str | None = None, group_size: int | None = None, bits: int | None = None,
                 symmetric: bool | None = None, include_embeddings: bool = True, backend: str = "auto",
                 threads: int = 1, batch_size: int = 1, seq_len: int = 128, repeats: int = 30,
                 min_sqnr_db: float = 20.0, max_accuracy_drop: float = 0.5,
                 max_eval_samples: int | None = None, max_length: int | None = None,
                 export_dequantized: bool = False, qat_steps: int = 0, train_path: str | None = None,
                 qat_lr: float = 2e-5, qat_batch_size: int = 16, calib_path: str | None = None,
                 calib_samples: int = 256) -> dict[str, Any]:
    """Quantize the classifier in ``model_dir`` and write ``output`` with ``metrics.json``.

    Args:
        model_dir: a plain HF classifier folder (config.json with id2label, weights, tokenizer).
        scheme: int8 | int4 | nf4 | kmeans | fp32.
        output: folder to write (replaced atomically when complete).
        eval_path: labelled file for accuracy and logits SQNR (columns as in the model's recipe.yaml).
        granularity, group_size, bits, symmetric, include_embeddings: see :func:`make_config`.
        backend: int8/fp32 only: auto (measure all), torch, torchao or onnxruntime.
        threads: intra-op threads for every latency number (1 = the reference setting).
        batch_size, seq_len: the latency input shape.
        repeats: interleaved timing rounds.
        min_sqnr_db, max_accuracy_drop: parity a backend must keep to be chosen (dB, points).
        max_eval_samples: subsample the eval file.
        max_length: tokenization length for evaluation (default: recipe.yaml, else 128).
        export_dequantized: also write ``output/dequantized/`` (plain float HF folder).
        qat_steps: int4/nf4/kmeans: fake-quant recovery fine-tune of this many steps on
            ``train_path`` before quantizing (0: post-training quantization only).
        train_path, qat_lr, qat_batch_size: the recovery fine-tune's data and settings.
        calib_path, calib_samples: int8: texts for the mixed-precision search (labels unused);
            default ``train_path``, else ``eval_path`` (recorded in metrics.json).
    """

    cfg = make_config(scheme, granularity=granularity, group_size=group_size, bits=bits,
                      symmetric=symmetric, include_embeddings=include_embeddings)
    if backend not in BACKEND_CHOICES:
        raise QuantizeError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if scheme in ("int4", "nf4", "kmeans") and backend != "auto":
        raise QuantizeError(f"--backend applies to int8 (and fp32 ONNX); {scheme} is a weight-only "
                            f"storage format decoded to float at load")
    if qat_steps and scheme not in ("int4", "nf4", "kmeans"):
        raise QuantizeError(f"--qat-steps applies to int4, nf4 and kmeans, not {scheme}")
    if qat_steps and not train_path:
        raise QuantizeError("--qat-steps needs --train FILE (labelled data for the recovery fine-tune)")
    if scheme == "fp32" and backend not in ("auto", "onnxruntime"):
        raise QuantizeError("--scheme fp32 only writes the fp32 ONNX folder: use --backend onnxruntime")
    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: not a model folder (no config.json)")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise QuantizeError(f"--output {out}: exists and is not a folder")
    if out.resolve() == src.resolve():
        raise QuantizeError("--output must differ from --model (the fp32 model is the reference)")

    set_threads(threads)
    tok = load_tokenizer(str(src))
    model = load_model(str(src), "classification").eval()
    names = label_names_of(model)
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    data = _eval_setup(src, eval_path, tok, names, max_eval_samples, max_length)
    inputs = sample_inputs(tok, batch_size, seq_len)
    if "token_type_ids" not in inputs or getattr(model.config, "type_vocab_size", 0) <= 1:
        inputs.pop("token_type_ids", None)
    fp32_predict = torch_predict(model)
    ref = predict_all(fp32_predict, data) if data is not None else None
    ref_sample = fp32_predict(inputs).float()
    fp32 = {"size_mb": weights_size_mb(src), "accuracy": B.accuracy(ref, data.labels) if data else None}

    metrics: dict[str, Any] = {"model": str(src), "scheme": scheme,
                               "config": config_to_dict(cfg) if cfg is not None else None,
                               "eval_file": eval_path, "eval_n": len(data) if data else 0,
                               "latency_setting": {"batch_size": batch_size, "seq_len": seq_len, "threads": threads}}
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as work:
        if scheme in ("int8", "fp32"):
            if scheme == "fp32":

                path = Path(work) / "onnx-fp32"
                info = write_onnx_folder(model, path, tok, optimize=True, quantize=False)
                cands = [B.Candidate("onnxruntime-fp32-fused", "onnxruntime", B.onnx_predict(path), path, info)]
                failed: dict[str, str] = {}
            else:
                wanted = ["torch", "torchao", "onnxruntime"] if backend == "auto" else [backend]
                calib_file = calib_path or train_path or eval_path
                calib = (_eval_setup(src, calib_file, tok, names, calib_samples, max_length)
                         if calib_file else None)
                metrics["calib_file"] = calib_file
                cands, failed = B.build_candidates(model, tok, Path(work), wanted, calib=calib,
                                                   target_db=min_sqnr_db + 0.5)
            # Time first: a candidate the pre-screen drops (torchao eager: ~25x fp32) is not
            # worth a pass over the eval set.
            lat, dropped = B.time_candidates({"fp32": fp32_predict, **{c.name: c.predict for c in cands}},
                                             inputs, repeats=repeats)
            for c in cands:
                if c.name in lat:
                    c.metrics["latency_ms_p50"] = lat[c.name]["p50_ms"]
                    c.metrics["latency_ms_p95"] = lat[c.name]["p95_ms"]
                else:
                    c.metrics["dropped"] = dropped[c.name]
                c.metrics["sqnr_db_sample"] = sqnr_db(ref_sample, c.predict(inputs).float())
                c.metrics["size_mb"] = weights_size_mb(c.path) if c.path else None
            timed = [c for c in cands if c.name in lat]
            if data is not None:
                B.score_parity(timed, ref, data)
            for c in cands:  # without --eval, SQNR on the latency input is the parity measure
                c.metrics.setdefault("sqnr_db", c.metrics["sqnr_db_sample"])
            fp32["latency_ms_p50"] = lat["fp32"]["p50_ms"]
            savable = [c for c in cands if c.path is not None]
            chosen, why = B.choose(savable, fp32["accuracy"], min_sqnr_db=min_sqnr_db,
                                   max_accuracy_drop=max_accuracy_drop)
            if chosen is None:
                raise QuantizeError(f"{src}: {why}. Lower --min-sqnr / raise --max-accuracy-drop, "
                                    f"or try another --backend")
            _copy_into(chosen.path, tmp)
            metrics["candidates"] = {c.name: {"backend": c.backend, **c.metrics, "info": c.info} for c in cands}
            metrics["failed_backends"] = failed
            metrics.update(backend=chosen.backend, backend_candidate=chosen.name, backend_reason=why,
                           sqnr_db=chosen.metrics["sqnr_db"], accuracy=chosen.metrics.get("accuracy"),
                           latency_ms_p50=chosen.metrics["latency_ms_p50"])
        else:
            q = quantize_(copy.deepcopy(model), cfg)
            if qat_steps:
                metrics["qat"] = _recover(model, q, cfg, src, tok, names, data, train_path, qat_steps,
                                          qat_lr, qat_batch_size, max_length, Path(work))
                q = quantize_(metrics["qat"].pop("model"), cfg)
            save_quantized(q, tmp, cfg, tok)
            # Exactness: what a reload gives must equal the in-memory quantized model.
            reloaded = load_quantized(tmp)
            with torch.inference_mode():
                same = torch.equal(q(**inputs).logits, reloaded(**inputs).logits)
            if not same:
                raise RuntimeError(f"{tmp}: reloaded quantized model differs from the one saved")
            served = dequantize_(reloaded)  # decoded once at load: fp32 kernels, compact on disk
            served_predict = torch_predict(served)
            lat, _ = B.time_candidates({"fp32": fp32_predict, "served": served_predict}, inputs,
                                       repeats=repeats, prescreen_ratio=1e9)
            fp32["latency_ms_p50"] = lat["fp32"]["p50_ms"]
            lg = predict_all(served_predict, data) if data is not None else None
            metrics.update(backend="torch (decoded to fp32 at load)", backend_reason=(
                f"{scheme} is a weight-only storage format: codes are decoded once at load and run "
                f"with fp32 kernels"), roundtrip_exact=same,
                sqnr_db=sqnr_db(ref, lg) if lg is not None else sqnr_db(ref_sample, served_predict(inputs)),
                accuracy=B.accuracy(lg, data.labels) if data is not None else None,
                latency_ms_p50=lat["served"]["p50_ms"])
            if export_dequantized:
                write_dequantized(reloaded, tmp / "dequantized", tok)
        metrics["size_mb"] = weights_size_mb(tmp)
        metrics["fp32"] = fp32
        metrics["compression"] = fp32["size_mb"] / max(metrics["size_mb"], 1e-9)
        metrics["speedup"] = fp32["latency_ms_p50"] / metrics["latency_ms_p50"]
        if metrics.get("accuracy") is not None and fp32["accuracy"] is not None:
            metrics["accuracy_drop_pt"] = (fp32["accuracy"] - metrics["accuracy"]) * 100
        metrics["hardware"] = hardware_fingerprint()
        if (src / "recipe.yaml").is_file():
            shutil.copy2(src / "recipe.yaml", tmp / "recipe.yaml")
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


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
# Loading any slimtune output for inference
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def format_summary(m: dict[str, Any]) -> str:
    """A short human summary of a run's metrics."""
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


