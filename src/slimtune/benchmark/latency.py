"""Measuring latency fairly: several models timed interleaved in one run, medians reported.

Timing model A for a minute and then model B for a minute lets CPU frequency, other processes
and cache state differ between them. Here every round times each model once, in a rotating
order, so drifts hit all models alike and the ratios are fair.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

SAMPLE_TEXT = ("the film is a charming , funny and often moving portrait of a family , "
               "although its second half drags and the ending feels rushed . ")


def sample_inputs(tokenizer: Any, batch_size: int = 1, seq_len: int = 128, pair: bool = False) -> dict[str, Any]:
    """Real-text inputs of exactly ``seq_len`` tokens per row (works for pruned vocabularies).

    The sample sentence is repeated until it is long enough, then truncated, so every model is
    timed on the same words through its own tokenizer.
    """
    text = SAMPLE_TEXT * (seq_len // 8 + 2)
    args = ([text] * batch_size, [text] * batch_size) if pair else ([text] * batch_size,)
    enc = tokenizer(*args, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return dict(enc)


def measure_latency(runners: dict[str, Callable[[], Any]], *, repeats: int = 50, warmup: int = 5,
                    min_seconds: float = 0.0) -> dict[str, dict[str, float]]:
    """Time each zero-argument callable ``repeats`` times, interleaved, after ``warmup`` calls.

    Returns per name: p50_ms, p95_ms, mean_ms, min_ms, n. With ``min_seconds`` > 0, rounds go on
    until that much time has passed (at least ``repeats`` rounds).
    """
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < repeats or time.perf_counter() - start < min_seconds:
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            t0 = time.perf_counter()
            runners[n]()
            times[n].append((time.perf_counter() - t0) * 1000)
        r += 1
    out = {}
    for n, ts in times.items():
        ts_sorted = sorted(ts)
        out[n] = {"p50_ms": statistics.median(ts), "p95_ms": ts_sorted[min(len(ts) - 1, int(0.95 * len(ts)))],
                  "mean_ms": statistics.fmean(ts), "min_ms": ts_sorted[0], "n": len(ts)}
    return out


def torch_runner(model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A callable running ``model(**inputs)`` in inference mode (eval mode set once)."""
    import torch

    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return run


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in torch (and ONNX Runtime sessions made by slimtune)."""
    import torch

    torch.set_num_threads(n)
    os.environ["SLIMTUNE_THREADS"] = str(n)


def hardware_fingerprint() -> dict[str, Any]:
    """CPU model, flags that matter for int8/bf16 kernels, cores, and library versions."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        text = open("/proc/cpuinfo").read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["flags"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                         "amx_bf16", "amx_int8", "avx_vnni", "fma"})
    except OSError:
        pass
    import importlib.metadata as md

    for pkg in ("torch", "transformers", "onnxruntime", "torchao", "peft"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


# --------------------------------------------------------------------------------------------
# Benchmarking saved models: `slimtune bench --model DIR [DIR ...]`
# --------------------------------------------------------------------------------------------


def current_rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc (0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def model_kind(model_dir: str | os.PathLike) -> str:
    """'onnx', 'quantized' or 'hf': how slimtune stores (and therefore runs) a model folder."""
    from pathlib import Path

    d = Path(model_dir)
    if (d / "model.onnx").is_file():
        return "onnx"
    if (d / "quantization.json").is_file():
        return "quantized"
    return "hf"


def count_stored_params(model_dir: str | os.PathLike) -> int:
    """Number of weights a model folder stores, read from file headers (no weights loaded).

    ONNX: elements of every initializer except quantization scales/zero points. Quantized
    folders: the logical shape of each quantized weight (``quantization.json``) plus the plain
    tensors. HF folders: every tensor in ``*.safetensors`` (top level only).
    """
    import json
    import math
    from pathlib import Path

    d = Path(model_dir)
    kind = model_kind(d)
    if kind == "onnx":
        import onnx

        graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
        return sum(math.prod(t.dims) for t in graph.initializer
                   if not t.name.endswith(("_scale", "_zero_point", "scale", "zero_point")))
    from safetensors import safe_open

    total = 0
    quant_meta: dict[str, Any] = {}
    if kind == "quantized":
        side = json.loads((d / "quantization.json").read_text())
        quant_meta = side.get("tensors", {})
        total += sum(math.prod(m["shape"]) for m in quant_meta.values())
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                if any(k.startswith(q + ".") for q in quant_meta):
                    continue  # codes/scales of a quantized weight: counted by its logical shape
                total += math.prod(f.get_slice(k).get_shape())
    return total


def load_predict(model_dir: str | os.PathLike, threads: int | None = None) -> tuple[Callable[[dict[str, Any]], Any], Any]:
    """``(predict(batch) -> logits, tokenizer)`` for any classifier folder slimtune writes.

    Uses :func:`slimtune.compress.quant.recipe.load_classifier` (ONNX Runtime, quantized or plain HF), so
    fp32, pruned, quantized and ONNX folders are all timed through the runtime they ship for.
    """
    from slimtune.compress.quant.recipe import load_classifier
    from slimtune.models.loading import load_tokenizer

    clf = load_classifier(model_dir, threads)
    tok = load_tokenizer(str(model_dir))

    def predict(batch: dict[str, Any]) -> Any:
        return clf(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    predict.config = getattr(clf, "config", {})  # type: ignore[attr-defined]
    return predict, tok


def evaluate_model_dir(model_dir: str | os.PathLike, eval_path: str, *, max_eval_samples: int | None = None,
                       max_length: int | None = None, batch_size: int = 64,
                       predict: Callable[[dict[str, Any]], Any] | None = None,
                       tokenizer: Any = None, text_column: str | None = None,
                       text_pair_column: str | None = None, label_column: str | None = None,
                       encoding: str | None = None, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class report of any slimtune classifier folder on a file.

    Columns, encoding and max_length default to the folder's ``recipe.yaml`` (as in
    ``slimtune evaluate``); label names come from ``config.json`` ``id2label``.
    """
    from pathlib import Path

    import yaml

    from slimtune.compress.quant.backends import predict_all
    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.evaluate.evaluator import classification_metrics

    if predict is None or tokenizer is None:
        predict, tokenizer = load_predict(model_dir)
    cfg = getattr(predict, "config", None) or {}
    if not cfg:
        import json

        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    id2label = {int(k): v for k, v in (cfg.get("id2label") or {}).items()}
    # transformers omits default LABEL_i names (and num_labels = 2) from config.json
    names = [id2label.get(i, f"LABEL_{i}") for i in range(len(id2label) or int(cfg.get("num_labels", 2)))]
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    d: dict[str, Any] = {}
    if (Path(model_dir) / "recipe.yaml").is_file():
        d = (yaml.safe_load((Path(model_dir) / "recipe.yaml").read_text()) or {}).get("data", {}) or {}
    data = load_classification(eval_path, text_column=text_column or d.get("text_column"),
                               text_pair_column=text_pair_column or d.get("text_pair_column"),
                               label_column=label_column or d.get("label_column"), label_names=names,
                               encoding=encoding or d.get("encoding") or "utf-8", max_rows=max_eval_samples,
                               skip_bad_rows=skip_bad_rows)
    tdata = tokenize_classification(data, tokenizer, max_length or d.get("max_length") or 128)
    if tdata.labels is None:
        raise ValueError(f"{eval_path}: no labels to evaluate against")
    t0 = time.perf_counter()
    logits = predict_all(predict, tdata, batch_size)
    result = classification_metrics(logits.argmax(-1).tolist(), tdata.labels, names)
    result["eval_file"] = str(eval_path)
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return result


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
    from pathlib import Path

    from slimtune.io import weights_size_mb

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
                inputs = {n: _model_inputs(predict, tok, bs, seq) for n, (predict, tok) in loaded.items()}
                runners = {n: (lambda p=loaded[n][0], x=inputs[n]: p(x)) for n in loaded}
                lat = measure_latency(runners, repeats=repeats, warmup=warmup, min_seconds=min_seconds)
                for n, m in lat.items():
                    rows[n]["latency"].append({"threads": t, "batch_size": bs, "seq_len": seq,
                                               "p50_ms": m["p50_ms"], "p95_ms": m["p95_ms"],
                                               "mean_ms": m["mean_ms"], "n": m["n"],
                                               "throughput_per_s": bs * 1000.0 / m["p50_ms"]})
        del loaded
    import resource

    return {"models": rows, "settings": {"batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens),
                                         "threads": list(threads), "repeats": repeats, "warmup": warmup},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "hardware": hardware_fingerprint()}


def _preimport() -> None:
    """Import the runtimes before measuring load memory, so the first model does not pay for them."""
    import importlib

    for mod in ("transformers", "onnxruntime", "onnx", "slimtune.compress.quant.onnx", "slimtune.compress.quant.storage",
                "transformers.models.bert.modeling_bert"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def _model_inputs(predict: Any, tok: Any, bs: int, seq: int) -> dict[str, Any]:
    """Real-text inputs; token_type_ids only for models that have more than one type."""
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






