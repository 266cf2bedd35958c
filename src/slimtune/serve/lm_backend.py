"""The decoder backend interface of ``slimtune serve``: what continuous batching needs from a causal LM.

A backend keeps the KV cache of every sequence being generated, each named by an int id the
engine (:mod:`slimtune.serve.engine`) gives it, and runs three operations:

- ``prefill(seqs)``: start sequences from their prompt token ids (one pass for all of them);
  returns each one's next-token logits;
- ``decode(seq_ids, tokens)``: feed one token to each live sequence, all in one pass; returns the
  next-token logits of each;
- ``release(seq_ids)``: forget sequences (finished, cancelled or failed).

The engine chooses tokens from the logits itself (:func:`slimtune.runtime.generate.next_tokens`),
so sampling, seeds, stop strings, EOS and streaming behave the same whatever runs the model.
``max_batch`` is how many sequences the backend can hold at once: a backend that cannot batch
sequences (one llama.cpp context holding one sequence) says 1, and the engine then serves one
request at a time through the same code.

:class:`slimtune.serve.torch_lm.TorchDecoder` runs transformers models; a llama.cpp backend for
GGUF files (``slimtune.runtime.llamacpp``) plugs in by implementing this class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch


class DecoderBackend(ABC):
    """A causal LM that holds many sequences' KV caches and steps them together.

    Attributes:
        name: What ``/healthz`` reports as the backend (``"torch"``, ``"llama.cpp"``).
        tokenizer: A transformers tokenizer (chat template, encode, decode).
        eos_ids: Token ids that end an answer.
        context_length: Most tokens (prompt + answer) one sequence may hold.
        max_batch: Most sequences held at once (1: no batching across requests).
        device: Where the forward passes run (``"cpu"``, ``"cuda:0"``).
    """

    name: str = "?"
    tokenizer: Any = None
    eos_ids: frozenset[int] = frozenset()
    context_length: int = 2048
    max_batch: int = 1
    device: str = "cpu"

    @abstractmethod
    def prefill(self, seqs: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Start sequences ``(seq_id, prompt token ids)`` (ids not held yet, prompts non-empty).

        Returns:
            float logits (len(seqs), vocab): the next-token scores of each, in order.
        """

    @abstractmethod
    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` (every one held) in one forward pass.

        Returns:
            float logits (len(seq_ids), vocab), in the order of ``seq_ids``.
        """

    @abstractmethod
    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop these sequences' caches (ids not held are ignored)."""

    def held(self) -> int:
        """How many sequences are held now (for metrics); backends may override."""
        return 0


__all__ = ["DecoderBackend"]
