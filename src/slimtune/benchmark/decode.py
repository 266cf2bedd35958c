"""Decoder speed at batch size 1: prefill tokens/s and greedy decode tokens/s, any backend.

A *runner* is a callable ``run(new_tokens) -> (prefill_seconds, decode_seconds)`` that prefills a
fixed prompt and then decodes ``new_tokens - 1`` more tokens greedily, end-of-generation ignored
(a speed run of a fixed length). :func:`torch_runner` makes one for a transformers causal LM (the
KV cache, arg-max, no sampling overhead), :func:`llamacpp_runner` for a GGUF opened with
:class:`slimtune.runtime.llamacpp.LlamaCppModel`. :func:`interleaved_speed` times several runners
round-robin, so every candidate sees the same machine state, and keeps each one's best round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from slimtune.runtime.generate import SamplingConfig, forward_last

Runner = Callable[[int], tuple[float, float]]


def torch_runner(model: torch.nn.Module, prompt_ids: Sequence[int]) -> Runner:
    """Prefill + greedy decode through the KV cache, with the forward pass ``slimtune generate``
    uses (:func:`slimtune.runtime.generate.forward_last`; no sampling, no stop checks)."""
    x = torch.tensor([list(prompt_ids)])
    n = x.shape[1]

    def run(new_tokens: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits, cache = forward_last(model, x, None, torch.arange(n)[None])
            t1 = time.perf_counter()
            for i in range(new_tokens - 1):
                tok = logits.argmax(-1, keepdim=True)
                logits, cache = forward_last(model, tok, None, torch.tensor([[n + i]]), cache)
            return t1 - t0, time.perf_counter() - t1

    return run


def llamacpp_runner(model: Any, prompt_ids: Sequence[int]) -> Runner:
    """Prefill + greedy decode of a :class:`~slimtune.runtime.llamacpp.LlamaCppModel`."""
    ids = list(prompt_ids)

    def run(new_tokens: int) -> tuple[float, float]:
        _, timing = model.generate(ids, SamplingConfig(max_new_tokens=new_tokens), stop_at_eos=False)
        return timing.prompt_seconds, timing.decode_seconds

    return run


def interleaved_speed(runners: dict[str, Runner], prompt_tokens: dict[str, int], *, new_tokens: int = 64,
                      repeats: int = 5) -> dict[str, dict[str, Any]]:
    """Best-of-``repeats`` prefill and decode speed of every runner, timed round-robin.

    Args:
        runners: name -> runner.
        prompt_tokens: name -> length of the prompt its runner prefills.
        new_tokens: tokens generated per run (the first comes from the prefill).
        repeats: rounds; one warm-up run of 4 tokens each comes first.

    Returns:
        name -> ``prompt_tokens``, ``prompt_tokens_per_s``, ``decode_tokens``,
        ``decode_tokens_per_s``, ``repeats``.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (one prefill token and at least one decode step)")
    for run in runners.values():
        run(4)
    best = {name: [math.inf, math.inf] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            pre, dec = run(new_tokens)
            best[name] = [min(best[name][0], pre), min(best[name][1], dec)]
    return {name: {"prompt_tokens": prompt_tokens[name],
                   "prompt_tokens_per_s": round(prompt_tokens[name] / pre, 1),
                   "decode_tokens": new_tokens - 1, "decode_tokens_per_s": round((new_tokens - 1) / dec, 1),
                   "repeats": repeats}
            for name, (pre, dec) in best.items()}
