"""Measuring latency fairly: several models timed interleaved in one run, medians reported.

Timing model A for a minute and then model B for a minute lets CPU frequency, other processes
and cache state differ between them. Here every round times each model once, in a rotating
order, so drifts hit all models alike and the ratios are fair.
"""

from __future__ import annotations

import importlib
import resource
from pathlib import Path
from typing import Any

from slimtune.benchmark.timing import (
    current_rss_mb,
    hardware_fingerprint,
    measure_latency,
    sample_inputs,
    set_threads,
)
from slimtune.evaluate.evaluator import evaluate_model_dir
from slimtune.io import weights_size_mb
from slimtune.runtime.classifier import load_predict
from slimtune.runtime.folders import count_stored_params, model_kind

# --------------------------------------------------------------------------------------------
# Benchmarking saved models: `slimtune bench --model DIR [DIR ...]`
# --------------------------------------------------------------------------------------------


def bench_models(models: dict[str, str] | list[str], *, batch_sizes: list[int] | tuple[int, ...] = (1,),
                 seq_lens: list[int] | tuple[int, ...] = (128,), threads: list[int] | tuple[int, ...] = (1,),
                 repeats: int = 30, warmup: int = 5, min_seconds: float = 0.0,
                 eval_path: str | None = None, max_eval_samples: int | None = None) -> dict[str, Any]:
    """Benchmark several model folders side by side; return a JSON-able result.

    For every (threads, batch size, sequence length) setting all models are timed in ONE
    interleaved :func:`measure_latency` run, so their ratios are fair. Per model: kind, stored
    parameters, size on disk, RSS growth from loading it and running the first batch
    (``load_rss_mb``), latency p50/p95 and throughput (batch / p50) per setting, and with
    ``eval_path`` accuracy/macro-F1/per-class F1. ``load_rss_mb`` is measured in load order in
    one process: indicative (allocators reuse freed memory), not an isolated peak.

    Args:
        models: folders, or ``{name: folder}`` (names label the rows).
        batch_sizes, seq_lens, threads: the settings grid.
        repeats, warmup, min_seconds: see :func:`measure_latency`.
        eval_path, max_eval_samples: optional labelled file for accuracy (evaluated once, at the
            first thread count).
    """

    if not isinstance(models, dict):
        models = {str(m): str(m) for m in models}
    for d in models.values():
        if not (Path(d) / "config.json").is_file():
            raise FileNotFoundError(f"{d}: not a model folder (no config.json)")
    rows: dict[str, dict[str, Any]] = {
        n: {"path": str(d), "kind": model_kind(d), "params": count_stored_params(d),
            "size_mb": weights_size_mb(d), "latency": []} for n, d in models.items()}
    _preimport()
    for t in threads:
        set_threads(t)
        loaded: dict[str, tuple[Any, Any]] = {}
        for n, d in models.items():
            before = current_rss_mb()
            predict, tok = load_predict(d, t)
            predict(sample_inputs(tok, 1, 16))  # first call: lazy allocations, ORT arenas
            loaded[n] = (predict, tok)
            rows[n].setdefault("load_rss_mb", round(current_rss_mb() - before, 1))
        if eval_path:
            for n, (predict, tok) in loaded.items():
                if "accuracy" not in rows[n]:
                    rows[n].update(evaluate_model_dir(models[n], eval_path, max_eval_samples=max_eval_samples,
                                                      predict=predict, tokenizer=tok))
        for bs in batch_sizes:
            for seq in seq_lens:
                inputs = {n: model_inputs(predict, tok, bs, seq) for n, (predict, tok) in loaded.items()}
                runners = {n: (lambda p=loaded[n][0], x=inputs[n]: p(x)) for n in loaded}
                lat = measure_latency(runners, repeats=repeats, warmup=warmup, min_seconds=min_seconds)
                for n, m in lat.items():
                    rows[n]["latency"].append({"threads": t, "batch_size": bs, "seq_len": seq,
                                               "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"],
                                               "mean_ms": m["mean_ms"], "n": m["n"],
                                               "throughput_per_s": bs * 1000.0 / m["p50_ms"]})
        del loaded

    return {"models": rows, "settings": {"batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens),
                                         "threads": list(threads), "repeats": repeats, "warmup": warmup},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "hardware": hardware_fingerprint()}


def _preimport() -> None:
    """Import the runtimes before measuring load memory, so the first model does not pay for them."""

    for mod in ("transformers", "onnxruntime", "onnx", "slimtune.compress.quant.onnx", "slimtune.compress.quant.storage",
                "transformers.models.bert.modeling_bert"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def model_inputs(predict: Any, tok: Any, bs: int, seq: int) -> dict[str, Any]:
    """Real-text inputs of ``bs`` x ``seq`` tokens for ``predict`` (from :func:`load_predict`);
    ``token_type_ids`` only for models that have more than one type."""
    x = sample_inputs(tok, bs, seq)
    if int((getattr(predict, "config", {}) or {}).get("type_vocab_size", 0) or 0) <= 1:
        x.pop("token_type_ids", None)
    return x


def latency_at(row: dict[str, Any], threads: int = 1, batch_size: int = 1, seq_len: int = 128) -> dict[str, Any] | None:
    """The latency entry of one bench row at a setting (None when not measured)."""
    for e in row.get("latency", []):
        if (e["threads"], e["batch_size"], e["seq_len"]) == (threads, batch_size, seq_len):
            return e
    return None


def format_bench(result: dict[str, Any], reference: str | None = None) -> str:
    """A Markdown table of a :func:`bench_models` result; ratios are vs ``reference`` (default: first)."""
    rows = result["models"]
    names = list(rows)
    ref = reference or names[0]
    lines = []
    for e in rows[ref]["latency"]:
        key = (e["threads"], e["batch_size"], e["seq_len"])
        lines.append(f"\nthreads {key[0]}, batch {key[1]}, seq {key[2]} (ratios vs {ref})\n")
        has_acc = any("accuracy" in r for r in rows.values())
        lines.append("| model | kind | params | size MB | p50 ms | p95 ms | samples/s | load RSS MB | x smaller | x faster |"
                     + (" accuracy |" if has_acc else ""))
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_acc else ""))
        base = latency_at(rows[ref], *key)
        for n in names:
            r, m = rows[n], latency_at(rows[n], *key)
            if m is None:
                continue
            acc = f" {r['accuracy']:.4f} |" if has_acc and "accuracy" in r else (" - |" if has_acc else "")
            lines.append(f"| {n} | {r['kind']} | {r['params']:,} | {r['size_mb']:.1f} | {m['p50_ms']:.2f} | "
                         f"{m['p95_ms']:.2f} | {m['throughput_per_s']:.1f} | {r.get('load_rss_mb', 0):.0f} | "
                         f"{rows[ref]['size_mb'] / max(r['size_mb'], 1e-9):.2f} | {base['p50_ms'] / m['p50_ms']:.2f} |" + acc)
    hw = result["hardware"]
    lines.append(f"\nhardware: {hw.get('cpu', '?')}, {hw.get('cores')} cores, flags {','.join(hw.get('flags', []))}; "
                 f"torch {hw.get('torch')}, onnxruntime {hw.get('onnxruntime')}; peak RSS {result['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


