"""Dynamic batching of classifier requests for ``slimtune serve``: a bounded queue and one worker
thread that owns the model (causal LMs are served by continuous batching instead,
:mod:`slimtune.serve.engine`).

Request handlers (asyncio) put one item on a bounded queue and await a future; the worker takes
the first waiting item, keeps collecting until ``max_batch_size`` rows are gathered or
``max_wait_ms`` has passed since that first item *arrived* (so under load, when items already
waited while the model was busy, it never waits again), runs the rows as one padded forward pass
(rows sorted by length) and routes each row's result back to its caller's future. A full queue
answers 503 with Retry-After at once instead of growing memory. A batch that raises is retried
one request at a time, so one poisoned input fails alone and the worker never dies.

The error a request is refused with is :class:`slimtune.serve.errors.ClientError` and the
settings are :class:`slimtune.serve.settings.ServeConfig` (both re-exported here).
"""

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimtune.serve.errors import ClientError
from slimtune.serve.metrics import Metrics
from slimtune.serve.models import Runner, pad_batch
from slimtune.serve.settings import ServeConfig


@dataclass
class _Item:
    rows: list[Any]  # str or (str, str)
    future: Any  # asyncio.Future resolved on its own loop
    loop: Any
    arrived: float


class Batcher:
    """Bounded queue + one worker thread that owns the model (see the module docstring)."""

    def __init__(self, runner: Runner, cfg: ServeConfig, metrics: Metrics):
        self.runner, self.cfg, self.metrics = runner, cfg, metrics
        self._q: queue.Queue[_Item] = queue.Queue(maxsize=cfg.max_queue)
        self._carry: _Item | None = None  # an item that did not fit the last batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slimtune-batcher", daemon=True)
        tok = runner.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while True:  # whoever still waits learns the server is going away
            try:
                item = self._carry or self._q.get_nowait()
            except queue.Empty:
                break
            self._carry = None
            self._resolve(item, ClientError(503, "shutting_down", "the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        return self._q.qsize() + (self._carry is not None)

    def submit(self, rows: list[Any]) -> Any:
        """Queue ``rows`` as one request; return an awaitable future. Full queue -> ClientError 503."""
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future(), loop, time.perf_counter())
        try:
            self._q.put_nowait(item)
        except queue.Full:
            raise ClientError(503, "overloaded", f"the request queue is full ({self.cfg.max_queue} waiting); "
                              "retry later", {"Retry-After": "1"}) from None
        return item.future

    # ---- worker thread ----

    def _collect(self) -> list[_Item]:
        """Block for a first item, then gather more until the row budget or the deadline is hit."""
        first = self._carry
        self._carry = None
        while first is None:
            if self._stop.is_set():
                return []
            try:
                first = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
        batch, rows = [first], len(first.rows)
        deadline = first.arrived + self.cfg.max_wait_ms / 1000
        while rows < self.cfg.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if rows + len(item.rows) > self.cfg.max_batch_size:
                self._carry = item  # heads the next batch; rows of a request are never split
                break
            batch.append(item)
            rows += len(item.rows)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                results = self._run(batch)
            except Exception:  # find the request that breaks the batch; the others still succeed
                logging.getLogger("slimtune.serve.app").exception("batch of %d requests failed", len(batch))
                with self.metrics._lock:
                    self.metrics.batch_errors += 1
                if len(batch) == 1:
                    results = [ClientError(500, "model_error", "the model failed on this request")]
                else:
                    results = []
                    for item in batch:
                        try:
                            results.append(self._run([item])[0])
                        except Exception as e:
                            results.append(ClientError(500, "model_error",
                                                       f"the model failed on this request ({type(e).__name__})"))
            for item, res in zip(batch, results, strict=True):
                self._resolve(item, res)

    @staticmethod
    def _resolve(item: _Item, result: Any) -> None:
        def put() -> None:
            if item.future.done():  # the caller timed out or went away
                return
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

        try:
            item.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    def _run(self, batch: list[_Item]) -> list[Any]:
        return self._classify(batch)

    def _classify(self, batch: list[_Item]) -> list[list[dict[str, Any]]]:

        r, tok = self.runner, self.runner.tokenizer
        flat = [(i, j, row) for i, it in enumerate(batch) for j, row in enumerate(it.rows)]
        firsts = [row if isinstance(row, str) else row[0] for _, _, row in flat]
        seconds = None if isinstance(flat[0][2], str) else [row[1] for _, _, row in flat]
        enc = tok(firsts, seconds, truncation=True, max_length=r.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        encs = [{k: enc[k][n] for k in keys} for n in range(len(flat))]
        order = sorted(range(len(flat)), key=lambda n: len(encs[n]["input_ids"]))  # similar lengths together
        out: list[list[Any]] = [[None] * len(it.rows) for it in batch]
        lengths = [len(encs[n]["input_ids"]) for n in order]
        for a, b in split_by_length(lengths, self.cfg.forward_cost_tokens, self.cfg.max_batch_size):
            chunk = order[a:b]
            t0 = time.perf_counter()
            logits = np.asarray(r.logits(pad_batch([encs[n] for n in chunk], self.pad_id)), dtype=np.float64)  # (B, C)
            self.metrics.batch(len(chunk), time.perf_counter() - t0)
            if r.multi_label:
                probs = 1 / (1 + np.exp(-logits))
            else:
                e = np.exp(logits - logits.max(-1, keepdims=True))
                probs = e / e.sum(-1, keepdims=True)
            if not np.isfinite(probs).all():
                raise FloatingPointError("non-finite model output")
            for n, p in zip(chunk, probs, strict=True):
                i, j, _ = flat[n]
                out[i][j] = {"label": r.label_names[int(p.argmax())],
                             "probabilities": {name: round(float(v), 6) for name, v in zip(r.label_names, p, strict=True)},
                             "truncated": len(encs[n]["input_ids"]) >= r.max_length}
        return out


def split_by_length(lengths: list[int], forward_cost: int, max_rows: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous chunks ``[a, b)`` of at most ``max_rows`` rows
    that minimise ``sum(forward_cost + rows * longest)``: the padded tokens computed plus a fixed
    cost per forward pass (Python and kernel-launch overhead, in token units).

    On a CPU the work of a padded batch grows with rows x its longest row, so one batch of short
    and long texts wastes most of its compute on padding; many tiny batches pay the fixed cost
    again and again. Exact dynamic programme over the cut points, O(n * max_rows) for n rows.
    """
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[b]: cheapest cost of lengths[:b]
    cut = [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(max(0, b - max_rows), b):
            c = best[a] + forward_cost + (b - a) * lengths[b - 1]  # lengths ascending: b-1 is longest
            if c < best[b]:
                best[b], cut[b] = c, a
    out, b = [], n
    while b > 0:
        out.append((cut[b], b))
        b = cut[b]
    return out[::-1]


__all__ = ["Batcher", "ClientError", "ServeConfig", "split_by_length"]
