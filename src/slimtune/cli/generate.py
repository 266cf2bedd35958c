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
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from slimtune.config.recipe import RecipeError
from slimtune.data.chat import load_prompts, prompt_row
from slimtune.data.datasets import DataError
from slimtune.io import atomic_write_text
from slimtune.runtime.generate import SamplingConfig, generate_text, load_for_generation

_HELP = {f.name: f.metadata["help"] for f in fields(SamplingConfig)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``generate`` flags."""
    p.add_argument("--model", required=True, help="model folder (merged, or a PEFT adapter folder such as OUT/adapter), or an alias")
    p.add_argument("--adapter", help="a PEFT adapter folder to apply onto --model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (a user message); without --prompt or --input: read stdin "
                                      "(JSON messages, {\"messages\": [...]}, or plain text)")
    src.add_argument("--input", help="JSONL of prompts: chat / alpaca / prompt(-completion) / text rows "
                                     "(a trailing answer is kept as the reference)")
    p.add_argument("--output", help="with --input: answers JSONL to write (default: stdout)")
    p.add_argument("--system", help="a system message put before the prompt (--prompt or stdin text)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="send the raw prompt text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256, help=_HELP["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=0.0, help=_HELP["temperature"])
    p.add_argument("--top-p", type=float, default=1.0, help=_HELP["top_p"])
    p.add_argument("--top-k", type=int, default=0, help=_HELP["top_k"])
    p.add_argument("--stop", action="append", default=[], help=_HELP["stop"] + " Repeatable.")
    p.add_argument("--seed", type=int, default=None, help=_HELP["seed"])
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --input")
    p.add_argument("--skip-bad-rows", action="store_true", help="with --input: count and skip malformed rows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer only when it is complete")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``slimtune generate`` on ``subparsers`` (sets ``func``)."""
    p = subparsers.add_parser("generate", help="generate text with a causal LM (prompt, stdin chat or JSONL; streamed)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


add_cli = add_parser  # the loader's older name


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
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, stop=list(args.stop), seed=args.seed)
    try:
        cfg.validate()
    except ValueError as e:
        raise RecipeError(f"--{str(e).split(' ')[0].replace('_', '-')}: {e}") from None
    if args.output and not args.input:
        raise RecipeError("--output needs --input (a single answer goes to stdout)")
    if args.input:
        rows, skipped = load_prompts(args.input, skip_bad_rows=args.skip_bad_rows)
        prompts = [r["messages"] for r in rows]
    elif args.prompt is not None:
        rows, skipped = [], 0
        prompts = [([{"role": "system", "content": args.system}] if args.system else [])
                   + [{"role": "user", "content": args.prompt}]]
    else:
        if sys.stdin.isatty():
            raise RecipeError("give --prompt, --input, or a chat on stdin")
        rows, skipped = [], 0
        prompts = [_stdin_messages(sys.stdin.read(), args.system)]
    model, tokenizer, _ = load_for_generation(args.model, args.adapter, dtype=args.dtype)
    t0 = time.perf_counter()
    if not args.input:
        stream = args.stream
        out = generate_text(model, tokenizer, prompts, cfg, chat_template=args.chat_template,
                            on_text=(lambda _, t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None)
        if not stream:
            sys.stdout.write(out[0].text)
        sys.stdout.write("\n")
        print(f"[slimtune] {len(out[0].token_ids)} tokens in {time.perf_counter() - t0:.2f} s "
              f"({out[0].finish_reason})", file=sys.stderr)
        return 0
    out = generate_text(model, tokenizer, prompts, cfg, chat_template=args.chat_template, batch_size=args.batch_size)
    lines = []
    for r, g in zip(rows, out, strict=True):
        user = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        rec = {"line": r["line"], "prompt": user, "generated": g.text, "finish_reason": g.finish_reason,
               "tokens": len(g.token_ids)}
        if r["reference"] is not None:
            rec["reference"] = r["reference"]
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, "".join(lines))
    else:
        sys.stdout.write("".join(lines))
    seconds = time.perf_counter() - t0
    n_tok = sum(len(g.token_ids) for g in out)
    print(f"[slimtune] {len(out)} answer(s), {n_tok} tokens in {seconds:.1f} s ({n_tok / max(seconds, 1e-9):.1f} tokens/s)"
          + (f"; {skipped} bad row(s) skipped" if skipped else "") + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0
