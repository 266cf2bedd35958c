"""Text generation from causal LMs: greedy or sampled, batched, streamed, with stop strings.

The loop is explicit (prefill once, then one token a step through the model's KV cache), so it
works the same for every model folder slimtune writes: merged full/LoRA models, base + PEFT
adapter folders (merged on load), and the methods' own formats (bottleneck adapters, shared
layers) through :func:`slimtune.models.loading.load_model`.

- Greedy (``temperature == 0``, the default) picks the arg-max token; it matches
  ``transformers`` ``model.generate(do_sample=False)`` token for token (``tests/test_generate.py``).
- Sampling follows transformers' order: logits / temperature, then top-k, then top-p (nucleus),
  then a draw from a ``torch.Generator`` seeded with ``seed`` (same seed, same text).
- Batches are left-padded; position ids count real tokens only (as transformers does), so a
  prompt generates the same tokens alone or in a batch, up to float rounding.
- A row stops at an EOS id (the model's ``generation_config`` EOS ids and the tokenizer's), at a
  stop string (the text is cut before it), or after ``max_new_tokens``.
- Streaming: :class:`TextStream` decodes incrementally and hands out only text that is final
  (never half a UTF-8 character, never the start of what may become a stop string).

One forward pass (:func:`forward_last`) and one token's bookkeeping (:func:`take_token`) are
functions of their own: ``slimtune serve``'s continuous batching (:mod:`slimtune.serve.engine`)
steps its sequences with the same two, so a served answer is made exactly as here.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from slimtune.compress.quant.kernels import to_kernels
from slimtune.compress.quant.storage import SIDECAR, load_quantized
from slimtune.config.fields import RecipeError, check_ranges, setting
from slimtune.data.chat import ChatRenderer, Message
from slimtune.models.loading import ModelError, load_model, load_tokenizer, refuse_pickle_only


@dataclass
class SamplingConfig:
    """How tokens are chosen and when generation stops."""

    max_new_tokens: int = setting(256, "Most tokens generated per answer.", ge=1)
    temperature: float = setting(0.0, "0: greedy (arg-max); > 0: sample from softmax(logits / temperature).", ge=0)
    top_p: float = setting(1.0, "Sampling: keep the smallest set of tokens whose probability reaches top_p (1: all).", gt=0, le=1)
    top_k: int = setting(0, "Sampling: keep the k most likely tokens (0: all).", ge=0)
    stop: list[str] = setting([], "Stop strings: generation ends where one appears (it is not part of the answer). Repeatable.")
    seed: int | None = setting(None, "Seed of the sampler (same seed, same text); None: torch's global RNG.")

    def validate(self) -> None:
        """Raise RecipeError for values out of range (naming the flag)."""
        check_ranges(self, "--")
        if any(not s for s in self.stop):
            raise RecipeError("--stop: stop strings must be non-empty")


@dataclass
class GenerateSettings(SamplingConfig):
    """Everything ``slimtune generate`` does: what to load, where prompts come from, how to sample."""

    model: str | None = setting(None, "Model folder (merged, or a PEFT adapter folder such as OUT/adapter), or an alias.")
    adapter: str | None = setting(None, "A PEFT adapter folder to apply onto --model.")
    prompt: str | None = setting(None, "One prompt (a user message); without --prompt or --input: read stdin (JSON messages, {\"messages\": [...]}, or plain text).")
    input: str | None = setting(None, "JSONL of prompts: chat / alpaca / prompt(-completion) / text rows (a trailing answer is kept as the reference).")
    output: str | None = setting(None, "With --input: answers JSONL to write (default: stdout).")
    system: str | None = setting(None, "A system message put before the prompt (--prompt or stdin text).")
    chat_template: bool = setting(True, "Render the prompt with the model's chat template (--no-chat-template sends the raw text).")
    batch_size: int = setting(8, "Prompts per batch with --input.", ge=1)
    skip_bad_rows: bool = setting(False, "With --input: count and skip malformed rows.")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "Dtype the weights are loaded in.")
    stream: bool = setting(True, "Print a single answer token by token as it is made (--no-stream: when complete).")

    def validate(self) -> None:
        """Ranges, then the rules between fields."""
        super().validate()
        if not self.model:
            raise RecipeError("--model: is required (a model folder or alias)")
        if self.prompt is not None and self.input:
            raise RecipeError("--prompt and --input: give one of them, not both")
        if self.output and not self.input:
            raise RecipeError("--output needs --input (a single answer goes to stdout)")

    def sampling(self) -> SamplingConfig:
        """Just the sampling settings."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})


@dataclass
class Generation:
    """One generated answer."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string) or "length"


# --------------------------------------------------------------------------------------------
# Choosing the next token
# --------------------------------------------------------------------------------------------


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row: logits (B, V) -> ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose total mass is <= 1 - top_p,
        # always keeping the most likely token.
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Incremental decoding and stop strings
# --------------------------------------------------------------------------------------------


class TextStream:
    """Decodes one row's tokens as they come; finds stop strings; yields only final text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut before a stop string once one is found)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (may be empty)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        self.text = text
        # A stop string can only complete in text not handed out yet (held-back prefixes
        # included); the margin of len(s) covers decoders that revise the last characters.
        hits = [at for s in self.stop if (at := text.find(s, max(0, self.emitted - len(s)))) != -1]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.flush()
        safe = len(text) - self._held_back(text)
        out = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that starts some stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if s.startswith(text[-n:]):
                    held = n
                    break
        return held

    def flush(self) -> str:
        """The rest of the (final) text."""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def id_set(*values: Any) -> set[int]:
    """The token ids in ``values``, each an id, a list of ids or None (how configs spell ``eos_token_id``)."""
    ids: set[int] = set()
    for v in values:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    gen = getattr(model, "generation_config", None)
    return id_set(getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                  tokenizer.eos_token_id)


def forward_last(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
    """One forward pass of a causal LM through its KV cache: ``(logits (B, V) of each row's last
    position, the cache to pass next time)`` (the cache is None when the model keeps none).

    ``cache`` None starts one (a prefill). Only the last position's logits are computed where the
    model takes ``logits_to_keep``: skips the LM head over the whole prompt (a (B, L, vocab) matmul,
    ~20% of SmolLM2's prefill), as transformers' generate does.
    """
    params = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if cache is not None:  # transformers 5 calls the KV cache ``cache``; 4.x ``past_key_values``
        kw["cache" if "cache" in params else "past_key_values"] = cache
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kw)
    return out.logits[:, -1, :], getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def take_token(stream: TextStream, token: int, eos: set[int] | frozenset[int], last: bool) -> tuple[str, str | None]:
    """Hand one generated token to its row's :class:`TextStream`.

    Returns:
        ``(text that became final, finish reason)``: the reason is ``"eos"`` (an EOS id: not part of
        the text), ``"stop"`` (a stop string completed; the text is cut before it), ``"length"``
        (``last``: the token budget is spent) or None (go on).
    """
    if token in eos:
        return stream.flush(), "eos"
    piece = stream.push(token)
    if stream.stopped:
        return piece, "stop"
    if last:
        return piece + stream.flush(), "length"
    return piece, None


@torch.inference_mode()
def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                 on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
    """Generate an answer for every prompt (token ids), as one left-padded batch.

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids, ...) -> .logits``).
        tokenizer: decodes the answers (and finds stop strings).
        prompts: token ids of each prompt (non-empty).
        cfg: sampling and stopping settings.
        on_text: called as ``on_text(row, text)`` with each piece of final text as it is made
            (streaming).

    Returns:
        One :class:`Generation` per prompt, in order.
    """
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    B, L = len(prompts), max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every row's last prompt token is at L - 1
        ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[b, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generator = None
    if cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stops = set(eos_ids(model, tokenizer))
    streams = [TextStream(tokenizer, cfg.stop) for _ in range(B)]
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    logits, cache = forward_last(model, ids, mask if padded else None, positions)
    seq, seq_mask = ids, mask  # full sequences, used only when the model keeps no cache
    for step in range(cfg.max_new_tokens):
        nxt = next_tokens(logits, cfg, generator)  # (B,)
        for b in range(B):
            if reasons[b] is not None:
                continue
            t = int(nxt[b])
            tokens[b].append(t)
            piece, reasons[b] = take_token(streams[b], t, stops, step == cfg.max_new_tokens - 1)
            if piece and on_text is not None:
                on_text(b, piece)
        if all(r is not None for r in reasons):
            break
        nxt = nxt.masked_fill(torch.tensor([r is not None for r in reasons], device=device), pad)
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
        positions = positions[:, -1:] + 1
        if cache is not None:
            logits, cache = forward_last(model, nxt[:, None], mask if padded else None, positions, cache)
        else:  # no KV cache: run the whole sequence again
            seq, seq_mask = torch.cat([seq, nxt[:, None]], dim=1), mask
            pos = (seq_mask.cumsum(-1) - 1).clamp_min(0)
            logits, _ = forward_last(model, seq, seq_mask if padded else None, pos)
    model.train(was_training)
    return [Generation(s.text, tk, r or "length") for s, tk, r in zip(streams, tokens, reasons, strict=True)]


def prompt_ids(tokenizer: Any, prompt: str | list[Message], *, chat_template: bool = True,
               template_mode: str = "auto") -> list[int]:
    """Token ids of a prompt: messages (or a string as one user message) rendered with the chat
    template and the assistant header, or, with ``chat_template=False``, the raw string (the
    tokenizer adds its usual special tokens; messages are concatenated)."""
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = ChatRenderer(tokenizer, template_mode).render(messages, add_generation_prompt=True)
        # A rendered template already holds its special tokens (what SFT tokenized, too).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    return list(tokenizer(text)["input_ids"])


def generate_text(model: Any, tokenizer: Any, prompts: Sequence[str | list[Message]], cfg: SamplingConfig, *,
                  chat_template: bool = True, batch_size: int = 8,
                  on_text: Callable[[int, str], None] | None = None) -> list[Generation]:
    """Answers for prompts (strings or message lists), in batches of prompts of similar length.

    ``on_text(i, text)`` streams with ``i`` the prompt's index in ``prompts``.
    """
    ids = [prompt_ids(tokenizer, p, chat_template=chat_template) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        cb = None if on_text is None else (lambda b, t, chunk=chunk: on_text(chunk[b], t))
        for i, g in zip(chunk, generate_ids(model, tokenizer, [ids[i] for i in chunk], cfg, on_text=cb), strict=True):
            results[i] = g
    return [g for g in results if g is not None]


# --------------------------------------------------------------------------------------------
# Loading a model folder for generation
# --------------------------------------------------------------------------------------------


def load_for_generation(model: str | os.PathLike, adapter: str | os.PathLike | None = None, *,
                        dtype: str = "float32", merge: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, info)`` for any causal-LM folder slimtune writes (or an alias).

    - a model folder (``config.json``; merged full/LoRA output, or a method's own format);
    - a PEFT adapter folder (``adapter_config.json``, e.g. ``OUT/adapter``): its base model is
      read from ``base_model_name_or_path`` (or ``model`` when ``adapter`` is given separately);
    - ``adapter``: a PEFT adapter applied onto ``model``.

    LoRA-family adapters are merged into the weights (``merge``): faster, same outputs.
    """
    path = Path(model)
    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is None and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        adapter_dir, base = path, None
    else:
        base = str(model)
    info: dict[str, Any] = {"model": str(model)}
    if adapter_dir is not None:
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
        if base is None:
            base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{cfg_path}: no base_model_name_or_path; pass --model BASE --adapter {adapter_dir}")
        from peft import PeftModel  # optional dependency (the peft extra): adapter folders only

        refuse_pickle_only(adapter_dir)  # PEFT falls back to adapter_model.bin (a pickle)
        lm = PeftModel.from_pretrained(load_model(base, "causal-lm", dtype=dtype), str(adapter_dir))
        if merge and hasattr(lm, "merge_and_unload"):
            lm = lm.merge_and_unload()
        info.update(base=base, adapter=str(adapter_dir), merged=merge)
        tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    elif (path / SIDECAR).is_file():  # slimtune quantize of a decoder, torch backend: codes on the kernels
        lm = load_quantized(path)
        info["kernels"] = len(to_kernels(lm))
        tok_dir = base
    else:
        lm = load_model(base, "causal-lm", dtype=dtype)
        tok_dir = base
    tokenizer = load_tokenizer(str(tok_dir))
    lm.eval()
    return lm, tokenizer, info
