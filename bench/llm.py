"""Decoder benchmark: speed, size, perplexity and task accuracy of SmolLM2 variants, side by side.

One run, bs 1, at every ``--threads`` value, for:

- ``fp32 (transformers)``: the tuned model folder in transformers, fp32 (the reference);
- ``llama.cpp Q8_0`` and ``llama.cpp Q4_K_M``: the same tuned, uncompressed model made by
  llama.cpp's own tools (``convert_hf_to_gguf.py`` to f16, then ``llama_model_quantize``), the
  peer a user would pick;
- every ``--candidate NAME=GGUF[@HF_FOLDER]`` (e.g. slimtune's pruned and exported model; the HF
  folder it came from gives the tokenizer ids, default: the GGUF's folder) and
  ``--hf-candidate NAME=FOLDER`` (a transformers folder).

Measures:

- ``prompt_tokens_per_s``: prefill of a fixed chat prompt (about 100 tokens);
- ``decode_tokens_per_s``: greedy, ``--new-tokens`` tokens (end-of-generation ignored), after the
  first token; best of ``--repeats`` runs after a warm-up; rounds are interleaved across
  candidates so they all see the same machine state;
- ``mb``: size on disk of the weights file(s);
- ``answer_perplexity`` and ``exact_match`` / ``accuracy`` on ``--test`` (chat JSONL, short
  answers): every candidate gets the same token ids (rendered with the tuned model's chat
  template, tokenized by the HF tokenizer of the folder it came from), the same answer masks
  and the same greedy decoding (``slimtune.evaluate.generation`` definitions).

Usage (from the repo root; the llama.cpp source tree is the one llama-cpp-python's sdist vendors)::

    python bench/llm.py --tuned TUNED_DIR --test test.jsonl --llama-cpp-src LLAMA_CPP_DIR \\
        [--candidate slimtune=OUT/model.gguf@PRUNED_DIR] --out bench/results/llm.json

``--work DIR`` keeps the peer GGUF files between runs (made once).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimtune.benchmark.decode import interleaved_speed, llamacpp_runner, torch_runner
from slimtune.benchmark.timing import set_threads
from slimtune.data.chat import ChatRenderer, load_chat, references, tokenize_chat
from slimtune.evaluate.generation import evaluate_chat
from slimtune.evaluate.llamacpp import evaluate_chat_llamacpp
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.runtime.generate import prompt_ids
from slimtune.runtime.llamacpp import LlamaCppModel, llamacpp_version

SPEED_PROMPT = ("Write a short review of a film you saw recently: the story, the acting, the music, "
                "and whether you would recommend it to a friend who likes quiet dramas and long walks.")


@dataclass
class Candidate:
    """One model in one backend."""

    name: str
    backend: str  # "transformers" or "llama.cpp"
    path: Path  # HF folder or .gguf file
    tokenizer_dir: Path
    result: dict[str, Any] = field(default_factory=dict)


def _mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 1e6, 2)
    return round(sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".onnx")) / 1e6, 2)


# ------------------------------------------------------------------------------------------------
# peers made by llama.cpp's own tools
# ------------------------------------------------------------------------------------------------


def make_peers(tuned: Path, llama_src: Path, work: Path) -> dict[str, Path]:
    """Q8_0 and Q4_K_M GGUF files of ``tuned``, made by llama.cpp's converter and quantizer."""
    import llama_cpp  # optional dependency: built from source

    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "tuned-f16.gguf"
    if not f16.is_file():
        subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(tuned), "--outtype", "f16",
                        "--outfile", str(f16)], check=True, capture_output=True)
    out = {}
    for name, ftype in (("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        dst = work / f"tuned-{name.lower()}.gguf"
        if not dst.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize failed for {dst}")
        out[name] = dst
    return out


# ------------------------------------------------------------------------------------------------
# speed
# ------------------------------------------------------------------------------------------------


def measure_speed(cands: list[Candidate], threads: int, new_tokens: int, repeats: int) -> None:
    """Interleaved rounds (slimtune.benchmark.decode): every candidate once per round, best kept."""
    set_threads(threads)
    runners, lengths, opened = {}, {}, []
    for c in cands:
        ids = prompt_ids(load_tokenizer(str(c.tokenizer_dir)), SPEED_PROMPT)
        if c.backend == "transformers":
            runners[c.name] = torch_runner(load_model(str(c.path), "causal-lm").eval(), ids)
        else:
            m = LlamaCppModel(c.path, n_threads=threads, n_ctx=len(ids) + new_tokens + 8)
            opened.append(m)
            runners[c.name] = llamacpp_runner(m, ids)
        lengths[c.name] = len(ids)
    speed = interleaved_speed(runners, lengths, new_tokens=new_tokens, repeats=repeats)
    for m in opened:
        m.close()
    for c in cands:
        c.result.setdefault("speed", {})[str(threads)] = speed[c.name]


# ------------------------------------------------------------------------------------------------
# task metrics (the same ids, masks and greedy decoding for every backend)
# ------------------------------------------------------------------------------------------------


def _chat_data(tok: Any, test: Path, rows: int, max_length: int) -> Any:
    chat = load_chat(test, max_rows=rows)
    data = tokenize_chat(chat, tok, max_length, renderer=ChatRenderer(tok, "auto"))
    data.info["references"] = references(chat)
    return data


def measure_task(cands: list[Candidate], test: Path, rows: int, threads: int, max_length: int) -> None:
    """Answer perplexity and exact match / accuracy of every candidate on ``rows`` test rows."""
    set_threads(threads)
    for c in cands:
        tok = load_tokenizer(str(c.tokenizer_dir))
        data = _chat_data(tok, test, rows, max_length)
        t0 = time.perf_counter()
        if c.backend == "transformers":
            m = load_model(str(c.path), "causal-lm").eval()
            r = evaluate_chat(m, tok, data, samples=0)
        else:
            r = evaluate_chat_llamacpp(
                lambda logits_all, n_ctx, c=c: LlamaCppModel(c.path, n_threads=threads, n_ctx=n_ctx,
                                                             logits_all=logits_all), tok, data)
        keep = ("answer_perplexity", "exact_match", "accuracy", "macro_f1", "answer_tokens")
        c.result["task"] = {k: r[k] for k in keep if k in r}
        c.result["task"]["rows"] = len(data.input_ids)
        c.result["task"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[llm] {c.name}: {c.result['task']}", flush=True)


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------


def table(cands: list[Candidate], threads: list[int], ref: str) -> str:
    """Markdown table; ratios against ``ref`` (decode speed) and the first llama.cpp Q4_K_M."""
    base = next(c for c in cands if c.name == ref)
    head = "| model | backend | MB | " + " | ".join(f"prompt tok/s {t}t | decode tok/s {t}t | x {ref} {t}t" for t in threads)
    head += " | answer ppl | exact match |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cands:
        cells = [c.name, c.backend, f"{c.result['mb']:.1f}"]
        for t in threads:
            s, b = c.result["speed"][str(t)], base.result["speed"][str(t)]
            cells += [f"{s['prompt_tokens_per_s']:.0f}", f"{s['decode_tokens_per_s']:.1f}",
                      f"{s['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x"]
        task = c.result.get("task", {})
        cells += [f"{task['answer_perplexity']:.4f}" if "answer_perplexity" in task else "-",
                  f"{task['exact_match']:.4f}" if "exact_match" in task else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_candidates(specs: list[str], hf_specs: list[str]) -> list[Candidate]:
    out = []
    for spec in specs:
        name, _, rest = spec.partition("=")
        gguf_path, _, tok_dir = rest.partition("@")
        out.append(Candidate(name, "llama.cpp", Path(gguf_path), Path(tok_dir) if tok_dir else Path(gguf_path).parent))
    for spec in hf_specs:
        name, _, folder = spec.partition("=")
        out.append(Candidate(name, "transformers", Path(folder), Path(folder)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tuned", required=True, type=Path, help="tuned (uncompressed) HF causal-LM folder")
    p.add_argument("--test", required=True, type=Path, help="held-out chat JSONL with short answers")
    p.add_argument("--llama-cpp-src", required=True, type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=GGUF[@HF_DIR]")
    p.add_argument("--hf-candidate", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--work", type=Path, default=Path("/tmp/slimtune-bench-llm"), help="peer GGUF files (kept)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=1000, help="test rows for perplexity and accuracy")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--no-task", action="store_true", help="speed and size only")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    peers = make_peers(a.tuned, a.llama_cpp_src, a.work)
    cands = [Candidate("fp32 (transformers)", "transformers", a.tuned, a.tuned),
             Candidate("llama.cpp Q8_0", "llama.cpp", peers["Q8_0"], a.tuned),
             Candidate("llama.cpp Q4_K_M", "llama.cpp", peers["Q4_K_M"], a.tuned),
             *_parse_candidates(a.candidate, a.hf_candidate)]
    for c in cands:
        c.result["mb"] = _mb(c.path)
    for t in threads:
        measure_speed(cands, t, a.new_tokens, a.repeats)
    if not a.no_task:
        measure_task(cands, a.test, a.rows, max(threads), a.max_length)
    md = table(cands, threads, "llama.cpp Q4_K_M")
    print(md)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "what": "bench/llm.py: decoder speed (bs 1), size, answer perplexity and task accuracy, side by side",
        "command": "python bench/llm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "llama_cpp_python": llamacpp_version()},
        "candidates": [{"name": c.name, "backend": c.backend, "path": str(c.path), **c.result} for c in cands],
        "table": md}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
