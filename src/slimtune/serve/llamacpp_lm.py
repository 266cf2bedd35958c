"""llama.cpp behind ``slimtune serve``'s continuous batching: many sequences in one llama.cpp context.

:class:`LlamaCppDecoder` implements :class:`slimtune.serve.lm_backend.DecoderBackend` for a GGUF
folder (``model.gguf`` beside the HF config and tokenizer: what ``slimtune quantize`` writes for a
decoder when llama.cpp measures fastest; :mod:`slimtune.runtime.gguf_folder`). It uses
llama.cpp's own multi-sequence API, so requests are batched as the torch backend batches them:

- one context holds up to ``max_batch`` sequences, each in its own KV-cache stream (a llama.cpp
  ``seq_id``; ``kv_unified`` off, so each has ``context_length`` cells of its own and attention
  never looks across sequences);
- ``prefill`` puts every new prompt into one ``llama_batch`` (cut into ``n_batch``-token
  pieces), asking for logits only at each prompt's last token;
- ``decode`` puts one token of every live sequence into one batch: one ``llama_decode`` steps
  them all (llama.cpp reads each weight once for the whole batch);
- ``release`` clears a sequence's cells (``llama_memory_seq_rm``) and frees its slot.

Logits come back as float32 torch tensors, so the engine samples, stops and streams exactly as it
does for torch. llama-cpp-python is optional (the ``llamacpp`` extra) and imported here only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.models.loading import ModelError
from slimtune.runtime.generate import id_set
from slimtune.serve.lm_backend import DecoderBackend


def folder_eos_ids(folder: Path, tokenizer: Any) -> set[int]:
    """End-of-answer ids of a GGUF folder: ``generation_config.json``'s, ``config.json``'s and the tokenizer's
    (the ids :func:`slimtune.runtime.generate.eos_ids` gives the torch backend)."""
    configs = [folder / n for n in ("generation_config.json", "config.json")]
    return id_set(tokenizer.eos_token_id,
                  *(json.loads(p.read_text(encoding="utf-8")).get("eos_token_id") for p in configs if p.is_file()))


class LlamaCppDecoder(DecoderBackend):
    """A GGUF model serving many sequences from one llama.cpp context (module docstring).

    Args:
        gguf: the ``.gguf`` file.
        tokenizer: the HF tokenizer beside it (chat template, encode, decode).
        eos_ids: ids that end an answer.
        threads: CPU threads (0: llama.cpp's default).
        max_batch: most sequences held at once (llama.cpp KV streams).
        context_length: most tokens one sequence holds (capped by the model's training context).
        n_batch: most tokens per ``llama_decode`` call.
        verbose: let llama.cpp print its load and context logs.

    Raises:
        ModelError: llama.cpp cannot load the file or make the context.
    """

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, tokenizer: Any, eos_ids: set[int], *, threads: int = 0, max_batch: int = 8,
                 context_length: int = 2048, n_batch: int = 512, verbose: bool = False):
        import llama_cpp  # optional dependency (the llamacpp extra): built from source
        from llama_cpp._logger import set_verbose  # optional dependency: the log filter

        set_verbose(verbose)

        self._ll = llama_cpp
        self.tokenizer, self.eos_ids = tokenizer, frozenset(eos_ids)
        self._model = self._ctx = self._batch = None
        llama_cpp.llama_backend_init()
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self._model:
            raise ModelError(f"{gguf}: llama.cpp could not load this GGUF file")
        n_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self.context_length = min(context_length, n_train) if n_train > 0 else context_length
        self.max_batch = max(1, min(max_batch, int(llama_cpp.llama_max_parallel_sequences())))
        self._n_batch = max(n_batch, self.max_batch)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = self.context_length * self.max_batch
        cp.n_batch = cp.n_ubatch = self._n_batch
        cp.n_seq_max = self.max_batch
        cp.kv_unified = False
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            self.close()
            raise ModelError(f"{gguf}: llama.cpp could not make a context of {self.max_batch} x "
                             f"{self.context_length} tokens")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._slot: dict[int, int] = {}  # seq id -> llama.cpp seq_id
        self._pos: dict[int, int] = {}  # seq id -> tokens in its cache
        self._free = list(range(self.max_batch - 1, -1, -1))

    def held(self) -> int:
        return len(self._slot)

    def _run(self, items: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Decode ``(slot, position, token, wants logits)`` items in ``n_batch`` pieces; the wanted logits, in order."""
        out: list[np.ndarray] = []
        b = self._batch
        for start in range(0, len(items), self._n_batch):
            piece = items[start:start + self._n_batch]
            b.n_tokens = len(piece)
            for i, (slot, pos, tok, want) in enumerate(piece):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = slot
            rc = self._ll.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for {len(piece)} tokens")
            for i, (*_, want) in enumerate(piece):
                if want:
                    ptr = self._ll.llama_get_logits_ith(self._ctx, i)
                    out.append(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).copy())
        return out

    def prefill(self, seqs: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        if not seqs or any(len(p) == 0 for _, p in seqs):
            raise ValueError("prefill needs at least one non-empty prompt")
        if len(seqs) > len(self._free):
            raise ValueError(f"{len(seqs)} new sequences, room for {len(self._free)}")
        if any(len(p) > self.context_length for _, p in seqs):
            raise ValueError(f"a prompt is longer than the context of {self.context_length} tokens")
        items: list[tuple[int, int, int, bool]] = []
        for sid, prompt in seqs:
            slot = self._free.pop()
            self._slot[sid], self._pos[sid] = slot, len(prompt)
            items += [(slot, j, int(t), j == len(prompt) - 1) for j, t in enumerate(prompt)]
        try:
            rows = self._run(items)
        except Exception:
            self.release([s for s, _ in seqs])
            raise
        return torch.from_numpy(np.stack(rows))

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        if sorted(seq_ids) != sorted(self._slot):
            raise ValueError("decode steps every held sequence, exactly once")
        items = [(self._slot[s], self._pos[s], int(t), True) for s, t in zip(seq_ids, tokens, strict=True)]
        rows = self._run(items)
        for s in seq_ids:
            self._pos[s] += 1
        return torch.from_numpy(np.stack(rows))

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in seq_ids:
            slot = self._slot.pop(s, None)
            if slot is None:
                continue
            self._pos.pop(s, None)
            self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._free.append(slot)

    def close(self) -> None:
        """Free the batch, the context and the model."""
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone already
            pass


__all__ = ["LlamaCppDecoder", "folder_eos_ids"]
