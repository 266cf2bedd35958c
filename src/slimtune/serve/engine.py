"""Continuous batching for ``slimtune serve``: one worker thread steps every live sequence together.

Requests for text (``/v1/chat/completions``, ``/v1/completions``, ``/v1/generate``) become
sequences on a bounded queue. The worker thread owns the model (a
:class:`slimtune.serve.lm_backend.DecoderBackend`) and loops:

1. **admit** waiting sequences while fewer than ``max_batch_size`` are live and the cache they
   would reserve (sequences x the longest prompt + ``max_tokens``, as the left-padded cache holds
   them) stays within ``max_batch_tokens`` (a sequence that does not fit waits, first in line;
   alone it always runs, bounded by the context length): their prompts are
   prefilled together (sorted and split by length like the classifier's batches,
   :func:`slimtune.serve.batching.split_by_length`) and joined to the running batch; when nothing
   is live it waits up to ``max_wait_ms`` after the first arrival for others to start with it;
2. **step**: one decode pass feeds every live sequence its last token; each chooses its next
   token with its own sampling settings and seed (:func:`slimtune.runtime.generate.next_tokens`)
   and hands it to its own :class:`~slimtune.runtime.generate.TextStream` (stop strings, UTF-8);
3. text that became final goes straight to that request's asyncio queue (streaming), and a
   sequence that ends (EOS, stop string, ``max_tokens``, cancelled by its client) leaves the
   batch at once, so a short answer never waits for a long one and a new request starts at
   the next step instead of after the whole batch.

A full queue refuses at once (503 + Retry-After). A prefill that raises is retried one sequence
at a time, so a poisoned prompt fails alone; a decode pass that raises fails the sequences in it
(500) and the worker goes on. The asyncio side (:class:`Handle`) reads events, and cancels its
sequence when the client goes away or times out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimtune.runtime.generate import SamplingConfig, TextStream, next_tokens, take_token
from slimtune.serve.batching import split_by_length
from slimtune.serve.errors import ClientError
from slimtune.serve.lm_backend import DecoderBackend
from slimtune.serve.metrics import Metrics
from slimtune.serve.settings import ServeConfig

_log = logging.getLogger("slimtune.serve.engine")


@dataclass
class Event:
    """What one sequence reports: final text, and at the end its finish reason and token counts."""

    text: str = ""
    finish_reason: str | None = None  # "eos", "stop" (a stop string) or "length"; None: more follows
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated tokens, a final EOS not counted
    error: ClientError | None = None


@dataclass
class _Seq:
    """One sequence: its request, its decoding state and where its events go."""

    id: int
    prompt: list[int]
    cfg: SamplingConfig
    sink: Any  # callable(tag, Event), safe to call from the worker thread
    tag: int
    arrived: float
    stream: TextStream
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        self.sink(self.tag, event)


class Handle:
    """The asyncio side of one request's sequences: ``await next_event()``, ``cancel()``."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs: list[_Seq] = []

    def sink(self, tag: int, event: Event) -> None:
        """Called from the worker thread: queue ``(tag, event)`` on this request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (tag, event))
        except RuntimeError:  # the event loop is closed (shutdown)
            pass

    async def next_event(self, timeout: float | None = None) -> tuple[int, Event]:
        """The next ``(tag, event)``; ClientError 503 when none comes within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise ClientError(503, "timeout", f"no answer within {timeout:g} s; retry later",
                              {"Retry-After": "1"}) from None

    def cancel(self) -> None:
        """Stop generating for every sequence of this request (the worker drops them at its next step)."""
        for s in self.seqs:
            s.cancelled = True


class Engine:
    """Bounded queue + one worker thread running continuous batching (see the module docstring)."""

    def __init__(self, backend: DecoderBackend, cfg: ServeConfig, metrics: Metrics):
        self.backend, self.cfg, self.metrics = backend, cfg, metrics
        self._q: queue.Queue[_Seq] = queue.Queue(maxsize=cfg.max_queue)
        self._live: dict[int, _Seq] = {}
        self._carry: _Seq | None = None  # taken from the queue, waiting for room in the batch
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="slimtune-engine", daemon=True)

    @property
    def capacity(self) -> int:
        """Most sequences decoded together: ``max_batch_size``, or fewer if the backend holds fewer."""
        return max(1, min(self.cfg.max_batch_size, self.backend.max_batch))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; everyone still waiting or generating gets 503 ``shutting_down``."""
        self._stop.set()
        self._thread.join(timeout=10)
        bye = ClientError(503, "shutting_down", "the server is shutting down")
        for s in list(self._live.values()):
            s.emit(Event(error=bye))
        self._live.clear()
        if self._carry is not None:
            self._carry.emit(Event(error=bye))
            self._carry = None
        while True:
            try:
                self._q.get_nowait().emit(Event(error=bye))
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def depth(self) -> int:
        """Sequences waiting to start."""
        return self._q.qsize() + (self._carry is not None)

    def live(self) -> int:
        """Sequences being generated now."""
        return len(self._live)

    def submit(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> Handle:
        """Queue one sequence per prompt (tags 0, 1, ...) under ``cfg``; ClientError 503 if the queue is full.

        Must be called on the event loop that will read the handle.
        """
        handle = Handle(self, asyncio.get_running_loop())
        now = time.perf_counter()
        for tag, p in enumerate(prompts):
            gen = None
            if cfg.temperature > 0 and cfg.seed is not None:  # prompt k of a request draws with seed + k
                gen = torch.Generator(device=self.backend.device).manual_seed(cfg.seed + tag)
            s = _Seq(next(self._ids), list(p), cfg, handle.sink, tag, now, TextStream(self.backend.tokenizer, cfg.stop),
                     gen)
            try:
                self._q.put_nowait(s)
            except queue.Full:
                handle.cancel()  # the ones already queued are skipped by the worker
                raise ClientError(503, "overloaded", f"the request queue is full ({self.cfg.max_queue} waiting); "
                                  "retry later", {"Retry-After": "1"}) from None
            handle.seqs.append(s)
        return handle

    # ---- worker thread ----

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit(self._collect())
                self._drop_cancelled()
                if self._live:
                    self._step()
            except Exception:  # a failed decode pass: fail what was in it; the worker goes on
                _log.exception("decode step over %d sequences failed", len(self._live))
                with self.metrics._lock:
                    self.metrics.batch_errors += 1
                self._fail(list(self._live.values()), "the model failed while generating")

    def _collect(self) -> list[_Seq]:
        """Waiting sequences to start now: as many as fit (capacity and ``max_batch_tokens``); blocks
        (and gathers for ``max_wait_ms`` after the first arrival) only when nothing is live."""
        new: list[_Seq] = []
        if self._live or self._carry is not None:
            self._take(new, None)
            return [s for s in new if not s.cancelled]
        while not new and not self._stop.is_set():
            try:
                new.append(self._q.get(timeout=0.1))
            except queue.Empty:
                continue
        if new:
            self._take(new, new[0].arrived + self.cfg.max_wait_ms / 1000)
        return [s for s in new if not s.cancelled]

    def _take(self, new: list[_Seq], deadline: float | None) -> None:
        """Append waiting sequences to ``new`` while they fit; wait for more until ``deadline`` (None: never)."""
        rows = list(self._live.values()) + new
        while len(rows) < self.capacity:
            if self._carry is not None:
                s, self._carry = self._carry, None
            else:
                remaining = (deadline - time.perf_counter()) if deadline is not None else 0.0
                try:
                    s = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    return
            if s.cancelled:
                continue
            if rows and self._reserved([*rows, s]) > self.cfg.max_batch_tokens:
                self._carry = s  # first in line once a sequence ends
                return
            new.append(s)
            rows.append(s)

    @staticmethod
    def _reserved(rows: list[_Seq]) -> int:
        """KV-cache tokens ``rows`` may reach together: rows x the longest prompt + answer budget."""
        return len(rows) * max(len(s.prompt) + s.cfg.max_new_tokens for s in rows)

    def _admit(self, new: list[_Seq]) -> None:
        """Prefill ``new`` (split by length) and take each one's first token."""
        if not new:
            return
        new.sort(key=lambda s: len(s.prompt))
        for a, b in split_by_length([len(s.prompt) for s in new], self.cfg.forward_cost_tokens, len(new)):
            group = new[a:b]
            try:
                logits = self.backend.prefill([(s.id, s.prompt) for s in group])
            except Exception:
                _log.exception("prefill of %d sequences failed", len(group))
                self.backend.release([s.id for s in group])
                if len(group) > 1:  # one at a time: only the poisoned prompt fails
                    for s in group:
                        self._admit_one(s)
                else:
                    self._fail(group, "the model failed on this prompt")
                continue
            self._start(group, logits)

    def _admit_one(self, s: _Seq) -> None:
        try:
            self._start([s], self.backend.prefill([(s.id, s.prompt)]))
        except Exception:
            _log.exception("prefill failed")
            self.backend.release([s.id])
            self._fail([s], "the model failed on this prompt")

    def _start(self, group: list[_Seq], logits: torch.Tensor) -> None:
        now = time.perf_counter()
        for s in group:
            self._live[s.id] = s
            self.metrics.first_token(now - s.arrived, len(s.prompt))
        self._advance(group, logits)

    def _step(self) -> None:
        rows = list(self._live.values())
        t0 = time.perf_counter()
        logits = self.backend.decode([s.id for s in rows], [s.tokens[-1] for s in rows])
        self.metrics.batch(len(rows), time.perf_counter() - t0)
        self._advance(rows, logits)

    def _advance(self, rows: list[_Seq], logits: torch.Tensor) -> None:
        """Choose each row's next token, stream its text, and retire the rows that ended."""
        chosen = logits.argmax(dim=-1).tolist()  # greedy rows; sampled rows draw below
        for i, s in enumerate(rows):
            if s.cfg.temperature > 0:
                chosen[i] = int(next_tokens(logits[i:i + 1], s.cfg, s.generator)[0])
        done = []
        for s, t in zip(rows, chosen, strict=True):
            s.tokens.append(int(t))
            last = len(s.tokens) >= s.cfg.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.backend.context_length
            piece, reason = take_token(s.stream, int(t), self.backend.eos_ids, last)
            if reason is not None:
                n = len(s.tokens) - (reason == "eos")
                s.emit(Event(piece, reason, len(s.prompt), n))
                self.metrics.generated(n)
                done.append(s.id)
            elif piece:
                s.emit(Event(piece))
        self._retire(done)

    def _drop_cancelled(self) -> None:
        gone = [s.id for s in self._live.values() if s.cancelled]
        if gone:
            self.metrics.generated(sum(len(self._live[i].tokens) for i in gone))
            self._retire(gone)

    def _retire(self, seq_ids: list[int]) -> None:
        if not seq_ids:
            return
        for i in seq_ids:
            self._live.pop(i, None)
        try:
            self.backend.release(seq_ids)
        except Exception:  # a backend left broken by a failed pass: drop everything it holds
            _log.exception("release failed; dropping every sequence")
            self._fail(list(self._live.values()), "the model failed while generating")

    def _fail(self, seqs: list[_Seq], message: str) -> None:
        for s in seqs:
            s.emit(Event(error=ClientError(500, "model_error", message)))
        self._retire([s.id for s in seqs])


__all__ = ["Engine", "Event", "Handle"]
