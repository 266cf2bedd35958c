"""Timing primitives: interleaved latency, thread settings, hardware fingerprint, RSS.

Leaf module (no slimtune imports), so every stage can time itself without import circles.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

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

    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return run


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in torch (and ONNX Runtime sessions made by slimtune)."""

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

    for pkg in ("torch", "transformers", "onnxruntime", "torchao", "peft"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def current_rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc (0.0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


