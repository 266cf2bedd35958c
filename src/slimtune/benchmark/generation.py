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

GGUF folders (``slimtune quantize`` chose llama.cpp) are timed through llama.cpp in the same
interleaved runs (:func:`_gguf_runners`: its own prefill and greedy decoding, one sequence, so
batch size 1 only; a larger batch size with a GGUF folder is refused before anything loads).
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
from slimtune.runtime.generate import SamplingConfig, forward_last, load_for_generation
from slimtune.runtime.gguf_folder import is_gguf_folder, open_gguf_folder
from slimtune.runtime.llamacpp import LlamaCppModel


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


def _gguf_runners(lm: Any, ids: list[int], new_tokens: int) -> tuple[Any, Any]:
    """:func:`_runners` for a llama.cpp model (:class:`~slimtune.runtime.llamacpp.LlamaCppModel`), batch 1."""

    def prefill() -> Any:
        lm.llm.reset()
        lm.llm.eval(ids)

    def decode() -> Any:
        return lm.generate(ids, SamplingConfig(max_new_tokens=new_tokens + 1), stop_at_eos=False)

    return prefill, decode


def _gguf_params(d: str) -> int:
    """Weights stored in a GGUF folder's ``.gguf`` file(s) (every tensor's element count)."""
    from gguf import GGUFReader  # the gguf package: a dependency of the export stage

    return sum(int(t.n_elements) for f in Path(d).glob("*.gguf") for t in GGUFReader(f).tensors)


def _make_runners(model: Any, tok: Any, bs: int, seq: int, new_tokens: int) -> tuple[Any, Any]:
    """Runners of a torch model, or of a llama.cpp one (batch 1)."""
    ids = prompt_batch(tok, bs, seq)
    if isinstance(model, LlamaCppModel):
        return _gguf_runners(model, ids[0].tolist(), new_tokens)
    return _runners(model, ids, new_tokens)


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
    gguf = [n for n, d in models.items() if is_gguf_folder(d)]
    if gguf and max(batch_sizes) > 1:
        raise ValueError(f"{', '.join(gguf)}: a GGUF folder runs one sequence in llama.cpp; time it at batch size 1")
    rows: dict[str, dict[str, Any]] = {}
    for n, d in models.items():
        stored = Path(d).is_dir()
        rows[n] = {"path": str(d), "kind": ("gguf" if n in gguf else model_kind(d)) if stored else "alias",
                   "params": (_gguf_params(d) if n in gguf else count_stored_params(d)) if stored else None,
                   "size_mb": weights_size_mb(d) if stored else None, "latency": []}
    for t in threads:
        set_threads(t)
        loaded: dict[str, tuple[Any, Any]] = {}
        for n, d in models.items():
            before = current_rss_mb()
            if n in gguf:
                model, tok = open_gguf_folder(d, threads=t, n_ctx=max(seq_lens) + new_tokens + 16)
            else:
                model, tok, _ = load_for_generation(d)
                model.eval()
            _make_runners(model, tok, 1, 8, 1)[1]()  # first call: lazy allocations
            loaded[n] = (model, tok)
            rows[n].setdefault("load_rss_mb", round(current_rss_mb() - before, 1))
            if rows[n]["params"] is None and n not in gguf:
                rows[n]["params"] = sum(p.numel() for p in model.parameters())
        for bs in batch_sizes:
            for seq in seq_lens:
                pairs = {n: _make_runners(m, tok, bs, seq, new_tokens) for n, (m, tok) in loaded.items()}
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
        for n in gguf:
            loaded[n][0].close()
        del loaded
    return {"models": rows, "kind": "causal-lm",
            "settings": {"batch_sizes": list(batch_sizes), "seq_lens": list(seq_lens), "threads": list(threads),
                         "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens,
                         "latency": "prefill of batch x seq prompt tokens (time to first token)"},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "hardware": hardware_fingerprint()}
