"""Timing causal LMs side by side: prompt (prefill) latency and per-token decoding speed.

What a classifier's latency is for an encoder, the prefill is for a decoder: one forward pass
over a ``batch x seq`` prompt (the time to the first token). Decoding is then one token a step
through the KV cache; its speed is ``decode_ms_per_token`` (the mean over ``new_tokens`` steps
after a ``seq``-token prompt, EOS ignored, so every model decodes the same number of tokens).

As in :mod:`slimtune.benchmark.latency`, every model is timed in ONE interleaved
:func:`~slimtune.benchmark.timing.measure_latency` run per setting, through the generation loop's
own forward (:func:`slimtune.runtime.generate.forward_last`), on the same sample text tokenized by
each model's tokenizer. The result has the shape of :func:`~slimtune.benchmark.latency.bench_models`'
(``models -> {kind, params, size_mb, load_rss_mb, latency: [{threads, batch_size, seq_len, p50_ms,
p95_ms, mean_ms, n, throughput_per_s, ...}]}``), so :func:`~slimtune.benchmark.latency.format_bench`,
:func:`~slimtune.benchmark.latency.latency_at` and the report read it; each latency entry adds
``decode_ms_per_token`` and ``decode_tokens_per_s`` (tokens a second over the batch).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from slimtune.benchmark.timing import (
    SAMPLE_TEXT,
    current_rss_mb,
    hardware_fingerprint,
    measure_latency,
    set_threads,
)
from slimtune.io import weights_size_mb
from slimtune.runtime.folders import count_stored_params, model_kind
from slimtune.runtime.generate import forward_last, load_for_generation


def prompt_batch(tokenizer: Any, batch_size: int, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) token ids of the sample text (repeated until long enough), no special tokens."""
    ids = tokenizer(SAMPLE_TEXT * (seq_len // 8 + 2), add_special_tokens=False)["input_ids"][:seq_len]
    return torch.tensor([ids] * batch_size, dtype=torch.long)


def _runners(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[Any, Any]:
    """(prefill, prefill + ``new_tokens`` greedy decoding steps) as zero-argument callables."""
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)

    @torch.inference_mode()
    def prefill() -> Any:
        return forward_last(model, ids, None, positions)

    @torch.inference_mode()
    def decode() -> Any:
        logits, cache = forward_last(model, ids, None, positions)
        pos = positions[:, -1:]
        for _ in range(new_tokens):
            pos = pos + 1
            logits, cache = forward_last(model, logits.argmax(-1, keepdim=True), None, pos, cache)
        return logits

    return prefill, decode


def bench_decoders(models: dict[str, str], *, batch_sizes: list[int] | tuple[int, ...] = (1,),
                   seq_lens: list[int] | tuple[int, ...] = (128,), threads: list[int] | tuple[int, ...] = (1,),
                   repeats: int = 30, warmup: int = 5, min_seconds: float = 0.0,
                   new_tokens: int = 16) -> dict[str, Any]:
    """Prefill latency and decoding speed of causal-LM folders (``{name: folder or alias}``), side by side.

    Args:
        models: the folders (merged outputs, PEFT adapter folders, a method's own format) or aliases.
        batch_sizes, seq_lens, threads: the settings grid (``seq_lens``: prompt tokens).
        repeats, warmup, min_seconds: see :func:`~slimtune.benchmark.timing.measure_latency`.
        new_tokens: decoding steps timed after the prompt.
    """
    rows: dict[str, dict[str, Any]] = {}
    for n, d in models.items():
        stored = Path(d).is_dir()
        rows[n] = {"path": str(d), "kind": model_kind(d) if stored else "alias",
                   "params": count_stored_params(d) if stored else None,
                   "size_mb": weights_size_mb(d) if stored else None, "latency": []}
    for t in threads:
        set_threads(t)
        loaded: dict[str, tuple[Any, Any]] = {}
        for n, d in models.items():
            before = current_rss_mb()
            model, tok, _ = load_for_generation(d)
            model.eval()
            _runners(model, prompt_batch(tok, 1, 8), 1)[1]()  # first call: lazy allocations
            loaded[n] = (model, tok)
            rows[n].setdefault("load_rss_mb", round(current_rss_mb() - before, 1))
            if rows[n]["params"] is None:
                rows[n]["params"] = sum(p.numel() for p in model.parameters())
        for bs in batch_sizes:
            for seq in seq_lens:
                pairs = {n: _runners(m, prompt_batch(tok, bs, seq), new_tokens) for n, (m, tok) in loaded.items()}
                pre = measure_latency({n: p for n, (p, _) in pairs.items()}, repeats=repeats, warmup=warmup,
                                      min_seconds=min_seconds)
                dec = measure_latency({n: g for n, (_, g) in pairs.items()}, repeats=max(3, repeats // 4),
                                      warmup=min(warmup, 1), min_seconds=min_seconds)
                for n in loaded:
                    per_token = max(dec[n]["p50_ms"] - pre[n]["p50_ms"], 1e-6) / new_tokens
                    rows[n]["latency"].append({
                        "threads": t, "batch_size": bs, "seq_len": seq, "p50_ms": pre[n]["p50_ms"],
                        "p95_ms": pre[n]["p95_ms"], "mean_ms": pre[n]["mean_ms"], "n": pre[n]["n"],
                        "throughput_per_s": bs * 1000.0 / pre[n]["p50_ms"], "new_tokens": new_tokens,
                        "decode_ms_per_token": per_token, "decode_tokens_per_s": bs * 1000.0 / per_token})
        del loaded
    return {"models": rows, "kind": "causal-lm",
            "settings": {"batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens), "threads": list(threads),
                         "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens,
                         "latency": "prefill of batch x seq prompt tokens (time to first token)"},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "hardware": hardware_fingerprint()}
