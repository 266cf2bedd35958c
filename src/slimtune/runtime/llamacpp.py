"""Running a GGUF file with llama.cpp (``llama-cpp-python``): tokens, logits, generation, timing.

llama-cpp-python is an optional dependency (the ``llamacpp`` extra; PyPI has only its source,
``scripts/install.sh`` builds it): it is imported when a model is opened, and
:func:`llamacpp_available` says whether it can be.

- The tokenizer is the GGUF's own (llama.cpp tokenizes and detokenizes; no HF tokenizer needed).
  :meth:`LlamaCppModel.chat_ids` renders the GGUF's chat template.
- :meth:`LlamaCppModel.generate` runs the same contract as
  :func:`slimtune.runtime.generate.generate_ids` for one prompt: greedy at ``temperature == 0``,
  else temperature -> top-k -> top-p -> a draw seeded with ``seed`` (transformers' order, built
  as a llama.cpp sampler chain); it stops at an end-of-generation token, at a stop string (cut
  before it, via the same :class:`~slimtune.runtime.generate.TextStream`), or after
  ``max_new_tokens``; ``on_text`` streams final text. It returns a :class:`Timing`: prompt
  tokens/s (prefill up to the first token) and decode tokens/s (every later token).
- :meth:`LlamaCppModel.logits` gives the logits of every position (a model opened with
  ``logits_all=True``), for comparisons against transformers.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.runtime.generate import Generation, SamplingConfig, TextStream


def llamacpp_available() -> bool:
    """True if ``llama_cpp`` (llama-cpp-python) can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def llamacpp_version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    if not llamacpp_available():
        return None
    import llama_cpp  # optional dependency (the llamacpp extra): built from source

    return str(llama_cpp.__version__)


@dataclass
class Timing:
    """Where the time of one generation went."""

    prompt_tokens: int
    prompt_seconds: float  # prefill, until the first new token is chosen
    decode_tokens: int  # new tokens after the first
    decode_seconds: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"prompt_tokens": self.prompt_tokens, "prompt_seconds": round(self.prompt_seconds, 4),
                "prompt_tokens_per_s": round(self.prompt_tps, 1), "decode_tokens": self.decode_tokens,
                "decode_seconds": round(self.decode_seconds, 4), "decode_tokens_per_s": round(self.decode_tps, 1)}


class LlamaCppModel:
    """A GGUF file opened with llama.cpp.

    Args:
        path: the ``.gguf`` file.
        n_threads: CPU threads for prefill and decode (0: llama.cpp's default).
        n_ctx: context length (prompt + new tokens).
        logits_all: keep every position's logits (needed by :meth:`logits`; slower).
        verbose: let llama.cpp print its load log.
    """

    def __init__(self, path: str | Path, *, n_threads: int = 0, n_ctx: int = 2048, logits_all: bool = False,
                 verbose: bool = False):
        from llama_cpp import Llama  # optional dependency (the llamacpp extra): built from source

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        self.path = Path(path)
        self.n_threads = n_threads
        self.logits_all = logits_all
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or None,
                         n_threads_batch=n_threads or None, logits_all=logits_all, verbose=verbose)
        self.metadata: dict[str, str] = dict(self.llm.metadata)

    # ---------------------------------------------------------------------------------------
    # tokens
    # ---------------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def is_eog(self, token_id: int) -> bool:
        """An end-of-generation token (EOS, EOT, or one llama.cpp recognises as such)."""
        import llama_cpp  # optional dependency (the llamacpp extra): built from source

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model), int(token_id)))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the GGUF says, ``parse_special``
        reads control tokens written as text (``<|im_start|>``)."""
        return [int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a partial UTF-8 character at the end becomes U+FFFD, as in transformers)."""
        raw = self.llm.detokenize([int(i) for i in ids], special=not skip_special_tokens)
        return raw.decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the GGUF's ``tokenizer.chat_template``."""
        from llama_cpp import llama_chat_format  # optional dependency (the llamacpp extra)

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path}: no tokenizer.chat_template in the GGUF")
        eos = self.decode([self.llm.token_eos()], skip_special_tokens=False) if self.llm.token_eos() >= 0 else ""
        bos = self.decode([self.llm.token_bos()], skip_special_tokens=False) if self.llm.token_bos() >= 0 else ""
        fmt = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                  add_generation_prompt=add_generation_prompt)
        return self.tokenize(fmt(messages=messages).prompt, add_special=False)

    # ---------------------------------------------------------------------------------------
    # logits and generation
    # ---------------------------------------------------------------------------------------

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``ids``, (len(ids), n_vocab) float32 (needs ``logits_all=True``)."""
        if not self.logits_all:
            raise ValueError("open the model with logits_all=True to read every position's logits")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def _sampler(self, cfg: SamplingConfig) -> Any:
        import llama_cpp  # optional dependency (the llamacpp extra): built from source

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if cfg.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if cfg.top_k > 0:  # commutes with the temperature (a monotone rescaling)
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(cfg.top_k))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(cfg.temperature))
        if cfg.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(cfg.top_p, 1))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if cfg.seed is None else cfg.seed & 0xFFFFFFFF
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def generate(self, prompt_ids: Sequence[int], cfg: SamplingConfig, *,
                 on_text: Callable[[str], None] | None = None, stop_at_eos: bool = True) -> tuple[Generation, Timing]:
        """Generate one answer to ``prompt_ids``; returns it and its :class:`Timing`.

        ``stop_at_eos=False`` keeps going through end-of-generation tokens (comparisons and
        speed runs of a fixed length).

        Raises:
            ValueError: an empty prompt, or prompt + ``max_new_tokens`` longer than the context.
        """
        import llama_cpp  # optional dependency (the llamacpp extra): built from source

        cfg.validate()
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("the prompt needs at least one token")
        if len(ids) + cfg.max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceed the "
                             f"context of {self.n_ctx} tokens")
        chain = self._sampler(cfg)
        stream = TextStream(self, cfg.stop)
        tokens: list[int] = []
        reason: str | None = None
        self.llm.reset()
        t0 = time.perf_counter()
        t_first = t0
        try:
            self.llm.eval(ids)
            for step in range(cfg.max_new_tokens):
                tok = int(llama_cpp.llama_sampler_sample(chain, self.llm.ctx, -1))
                if step == 0:
                    t_first = time.perf_counter()
                tokens.append(tok)
                if stop_at_eos and self.is_eog(tok):
                    reason, piece = "eos", stream.flush()
                else:
                    piece = stream.push(tok)
                    if stream.stopped:
                        reason = "stop"
                    elif step == cfg.max_new_tokens - 1:
                        reason, piece = "length", piece + stream.flush()
                if piece and on_text is not None:
                    on_text(piece)
                if reason is not None:
                    break
                self.llm.eval([tok])
        finally:
            llama_cpp.llama_sampler_free(chain)
        t_end = time.perf_counter()
        timing = Timing(len(ids), t_first - t0, max(0, len(tokens) - 1), t_end - t_first)
        return Generation(stream.text, tokens, reason or "length"), timing

    def close(self) -> None:
        """Free the model and its context."""
        self.llm.close()


def measure_speed(path: str | Path, prompt_ids: Sequence[int], *, max_new_tokens: int = 64, n_threads: int = 1,
                  repeats: int = 3) -> dict[str, Any]:
    """Greedy generation speed of a GGUF file: the best of ``repeats`` runs (after one warm-up).

    Every run generates exactly ``max_new_tokens`` (end-of-generation tokens do not stop it). Returns the :class:`Timing` fields of the fastest prompt and decode runs.
    """
    model = LlamaCppModel(path, n_threads=n_threads, n_ctx=len(prompt_ids) + max_new_tokens + 8)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    try:
        model.generate(prompt_ids, SamplingConfig(max_new_tokens=4))  # warm-up: page the weights in
        runs = [model.generate(prompt_ids, cfg, stop_at_eos=False)[1] for _ in range(repeats)]
    finally:
        model.close()
    best_prompt = max(runs, key=lambda t: t.prompt_tps)
    best_decode = max(runs, key=lambda t: t.decode_tps)
    return {"threads": n_threads, "prompt_tokens": best_prompt.prompt_tokens,
            "prompt_tokens_per_s": round(best_prompt.prompt_tps, 1), "decode_tokens": best_decode.decode_tokens,
            "decode_tokens_per_s": round(best_decode.decode_tps, 1), "repeats": repeats}
