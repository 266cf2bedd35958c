"""Generate text with a causal LM: one prompt, a chat from stdin, or a JSONL file of prompts.

  slimtune generate --model OUT --prompt "Is this review fresh or rotten? A triumph."
  echo '[{"role": "user", "content": "Hi!"}]' | slimtune generate --model OUT
  slimtune generate --model OUT --input prompts.jsonl --output answers.jsonl

OUT is any folder slimtune finetune writes (merged model, or OUT/adapter: base + PEFT adapter),
a plain transformers folder, or an alias (smollm2). The prompt goes through the model's chat
template (--no-chat-template sends the raw text). Greedy by default; --temperature > 0 samples
(--top-p, --top-k, --seed). A single answer streams to stdout as it is made.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings, save_beside
from slimtune.config.recipe import RecipeError
from slimtune.data.chat import load_prompts, prompt_row
from slimtune.data.datasets import DataError
from slimtune.io import atomic_write_text
from slimtune.runtime.generate import GenerateSettings, generate_text, load_for_generation
from slimtune.runtime.gguf_folder import generate_text_gguf, is_gguf_folder, open_gguf_folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``generate`` flags, derived from :class:`GenerateSettings` (``--stop`` repeats)."""
    add_settings_arguments(p, GenerateSettings, exclude=("stop",))
    stop = next(f for f in fields(GenerateSettings) if f.name == "stop")
    p.add_argument("--stop", action="append", default=None, help=stop.metadata["help"])


def _stdin_messages(text: str, system: str | None) -> list[dict[str, str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, list):
        obj = {"messages": obj}
    if isinstance(obj, dict):
        msgs, _ = prompt_row(obj, "<stdin>")
        return ([{"role": "system", "content": system}] if system and msgs[0]["role"] != "system" else []) + msgs
    if not text.strip():
        raise DataError("<stdin>: empty; give --prompt, --input, or a chat on stdin")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text.strip()}]


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, stream or write the answers."""
    st = resolve_settings(GenerateSettings, args, "generate")
    if print_config(args, st):
        return 0
    cfg = st.sampling()
    if st.input:
        rows, skipped = load_prompts(st.input, skip_bad_rows=st.skip_bad_rows)
        prompts = [r["messages"] for r in rows]
    elif st.prompt is not None:
        rows, skipped = [], 0
        prompts = [([{"role": "system", "content": st.system}] if st.system else [])
                   + [{"role": "user", "content": st.prompt}]]
    else:
        if sys.stdin.isatty():
            raise RecipeError("give --prompt, --input, or a chat on stdin")
        rows, skipped = [], 0
        prompts = [_stdin_messages(sys.stdin.read(), st.system)]
    if is_gguf_folder(st.model) and st.adapter is None:  # slimtune quantize chose llama.cpp
        model, tokenizer = open_gguf_folder(st.model, n_ctx=8192)
        gen = functools.partial(generate_text_gguf, model)
    else:
        model, tokenizer, _ = load_for_generation(st.model, st.adapter, dtype=st.dtype)
        gen = functools.partial(generate_text, model)
    t0 = time.perf_counter()
    if not st.input:
        stream = st.stream
        out = gen(tokenizer, prompts, cfg, chat_template=st.chat_template,
                  on_text=(lambda _, t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None)
        if not stream:
            sys.stdout.write(out[0].text)
        sys.stdout.write("\n")
        print(f"[slimtune] {len(out[0].token_ids)} tokens in {time.perf_counter() - t0:.2f} s "
              f"({out[0].finish_reason})", file=sys.stderr)
        return 0
    kw = {} if gen.func is generate_text_gguf else {"batch_size": st.batch_size}
    out = gen(tokenizer, prompts, cfg, chat_template=st.chat_template, **kw)
    lines = []
    for r, g in zip(rows, out, strict=True):
        user = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        rec = {"line": r["line"], "prompt": user, "generated": g.text, "finish_reason": g.finish_reason,
               "tokens": len(g.token_ids)}
        if r["reference"] is not None:
            rec["reference"] = r["reference"]
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if st.output:
        Path(st.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(st.output, "".join(lines))
        save_beside(st, st.output, "generate")
    else:
        sys.stdout.write("".join(lines))
    seconds = time.perf_counter() - t0
    n_tok = sum(len(g.token_ids) for g in out)
    print(f"[slimtune] {len(out)} answer(s), {n_tok} tokens in {seconds:.1f} s ({n_tok / max(seconds, 1e-9):.1f} tokens/s)"
          + (f"; {skipped} bad row(s) skipped" if skipped else "") + (f" -> {st.output}" if st.output else ""),
          file=sys.stderr)
    return 0
