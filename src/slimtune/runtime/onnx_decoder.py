"""Running a decoder ONNX graph with past key values on onnxruntime (the graph ``slimtune export`` writes).

The graph's contract (the names optimum and onnxruntime-genai use):

- inputs ``input_ids`` (batch, sequence) int64, ``attention_mask`` (batch, past + sequence)
  int64, ``position_ids`` (batch, sequence) int64, and per layer ``past_key_values.<i>.key`` /
  ``.value`` (batch, kv_heads, past, head_dim) float32 (past 0 for the prompt);
- outputs ``logits`` (batch, sequence, vocab) and ``present.<i>.key`` / ``.value``
  (batch, kv_heads, past + sequence, head_dim): the next call's past.

:class:`OnnxDecoder` feeds it: a prefill, then one token a step, greedy, with left padding
handled as transformers does (positions count real tokens only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def past_names(n_layers: int) -> list[str]:
    """``past_key_values.<i>.key`` / ``.value`` for every layer, in graph order."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    """``present.<i>.key`` / ``.value`` for every layer, in graph order."""
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


class OnnxDecoder:
    """An onnxruntime session over a decoder graph with past key values.

    Args:
        path: the ``model.onnx`` file.
        threads: intra-op threads (0: onnxruntime's default).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        import onnxruntime as ort  # optional dependency (the quant extra)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layers = sum(1 for n in inputs if n.startswith("past_key_values.")) // 2
        first = inputs.get("past_key_values.0.key")
        if first is None:
            raise ValueError(f"{path}: no past_key_values.0.key input (not a decoder graph with past)")
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: (logits, present) for ``ids`` after ``past`` (None: an empty past)."""
        b = ids.shape[0]
        if past is None:
            past = [np.zeros((b, self.kv_heads, 0, self.head_dim), np.float32)] * (2 * self.n_layers)
        feeds: dict[str, Any] = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                                 "position_ids": positions.astype(np.int64)}
        feeds.update(zip(past_names(self.n_layers), past, strict=True))
        out = self.session.run(None, feeds)
        return out[0], list(out[1:])

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0,
               ) -> tuple[list[list[int]], list[np.ndarray]]:
        """Greedy tokens for each prompt (left-padded batch, no early stop), and the last-position
        logits of every step (step 0: the prefill), each (batch, vocab)."""
        length = max(len(p) for p in prompts)
        ids = np.full((len(prompts), length), pad_id, np.int64)
        mask = np.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, length - len(p):] = p
            mask[b, length - len(p):] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, past = self.run(ids, mask, positions, None)
        steps = [logits[:, -1]]
        tokens: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            nxt = steps[-1].argmax(-1)
            for b, t in enumerate(nxt):
                tokens[b].append(int(t))
            if step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, past = self.run(nxt[:, None], mask, positions, past)
            steps.append(logits[:, -1])
        return tokens, steps
