"""Benchmark one or more model folders (fp32 HF, pruned, quantized, ONNX; or causal LMs, GGUF folders included: prefill latency and decode tokens/s) in one run: every setting times all models interleaved, so ratios are fair. Ratios are vs the first --model. Every flag is a field of slimtune.benchmark.settings.BenchSettings (the bench: section of a pipeline recipe, which --config reads); with --output the resolved settings are written beside it as OUTPUT.bench.yaml."""

from __future__ import annotations

import argparse
import os

from slimtune.benchmark.generation import bench_decoders
from slimtune.benchmark.latency import bench_models, format_bench
from slimtune.benchmark.settings import BenchSettings
from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings, save_beside
from slimtune.cli.lists import comma_lists, require
from slimtune.compress.inputs import is_causal_lm_folder
from slimtune.io import atomic_write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune bench``: ``--config``, one flag per :class:`BenchSettings` field, ``--print-config``."""
    add_settings_arguments(p, BenchSettings)
    comma_lists(p, ("batch_sizes", "seq_lens", "threads"))


def model_names(folders: list[str]) -> dict[str, str]:
    """``{row name: folder}``: each folder's basename, primed when two folders share one."""
    names: dict[str, str] = {}
    for d in folders:
        name = os.path.basename(os.path.normpath(d)) or d
        while name in names:
            name += "'"
        names[name] = d
    return names


def run(args: argparse.Namespace) -> int:
    """``slimtune bench`` entry point: print the Markdown table, optionally write JSON (+ its settings)."""
    s = resolve_settings(BenchSettings, args, "bench")
    require(s, ("model",))
    if print_config(args, s):
        return 0
    if is_causal_lm_folder(s.model[0]):  # validate() made sure they all are
        result = bench_decoders(model_names(s.model), batch_sizes=s.batch_sizes, seq_lens=s.seq_lens,
                                threads=s.threads, repeats=s.repeats, warmup=s.warmup, min_seconds=s.min_seconds)
        print("latency = prefill of the prompt (time to first token); decoding in the rows below")
        print(format_bench(result))
        for n, r in result["models"].items():
            for e in r["latency"]:
                print(f"{n}: threads {e['threads']}, batch {e['batch_size']}, prompt {e['seq_len']}: "
                      f"{e['decode_ms_per_token']:.2f} ms/token ({e['decode_tokens_per_s']:.1f} tokens/s)")
    else:
        result = bench_models(model_names(s.model), batch_sizes=s.batch_sizes, seq_lens=s.seq_lens, threads=s.threads,
                              repeats=s.repeats, warmup=s.warmup, min_seconds=s.min_seconds,
                              eval_path=s.eval, max_eval_samples=s.max_eval_samples)
        print(format_bench(result))
    if s.output:
        atomic_write_json(s.output, result)
        print(f"wrote {s.output} (settings: {save_beside(s, s.output, 'bench')})")
    return 0
