"""``slimtune serve`` settings: one dataclass, every field a flag (derived by ``slimtune.cli``).

:class:`ServeConfig` holds where to listen (``host``, ``port``), what to serve (``model``), the
server's limits and batching, connection limits and timeouts (enforced by
:mod:`slimtune.serve.server`), and uvicorn's logging. :func:`slimtune.serve.app.create_app` and
the batcher read the limits; ``model``/``host``/``port``/``log_level``/``access_log`` are only
used by the command, so ``ServeConfig(max_wait_ms=1)`` is a complete config for an in-process
app (tests, embedding the app elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slimtune.config.fields import check_ranges, setting


@dataclass
class ServeConfig:
    """Where to listen, what to serve, server limits and batching (each field is a ``slimtune serve`` flag)."""

    model: str | None = setting(None, "Model folder written by slimtune (safetensors or model.onnx), or a packaged alias (smollm2); required by slimtune serve.", metavar="DIR")
    host: str = setting("127.0.0.1", "Bind address (loopback by default; binding elsewhere without --api-key logs a warning).")
    port: int = setting(8000, "TCP port to listen on.", ge=0, le=65535)
    model_id: str | None = setting(None, "The id clients pass as \"model\" to the OpenAI endpoints (listed by GET /v1/models); default: the model folder's name.", metavar="ID")
    max_batch_size: int = setting(32, "Most rows (texts) per forward pass; causal LMs: most sequences generated together (continuous batching). 1 = no batching.", ge=1)
    max_wait_ms: float = setting(5.0, "Longest a request waits for others to join its batch, counted from its arrival (causal LMs: only when nothing is being generated).", ge=0)
    max_batch_tokens: int = setting(32768, "Causal LMs: most KV-cache tokens the sequences generated together may reserve (sequences x the longest prompt + max_tokens among them, as the left-padded cache holds them); a request that does not fit waits for room (alone it always runs).", ge=1)
    max_queue: int = setting(256, "Most requests waiting; more are refused with 503 and Retry-After.", ge=1)
    api_key: str | None = setting(None, "Require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on /v1/* and /metrics.", metavar="KEY")
    max_texts: int = setting(64, "Most texts (or pairs) per classify request.", ge=1)
    max_chars: int = setting(4000, "Most characters per text or prompt.", ge=1)
    max_new_tokens: int = setting(256, "Upper bound on max_new_tokens (generate) and max_tokens (OpenAI endpoints; also their default); more is refused with 400/422.", ge=1)
    max_body_bytes: int = setting(1_000_000, "Largest request body accepted (413 above).", ge=1)
    request_timeout_s: float = setting(30.0, "A request not answered by then gets 503.", gt=0)
    threads: int | None = setting(None, "Intra-op threads for torch / ONNX Runtime (default: torch's).", ge=1)
    device: str = setting("cpu", "Where the model runs: cpu, cuda or cuda:N (torch and ONNX folders); checked before any weight loads.")
    forward_cost_tokens: int = setting(32, "Fixed cost of one forward pass, in padded tokens; a gathered batch (of texts, or of prompts to prefill) is split by length where that saves more padding than this (0: never split).", ge=0)
    max_connections: int = setting(1000, "Most open connections (keep it well under the process's open-file limit, ulimit -n). At the cap, the connection that has waited longest for its request headers is closed to make room; when none is waiting, the new one is closed.", ge=1)
    header_timeout_s: float = setting(10.0, "A connection must send its complete request headers within this time (after a response on a kept-alive one: keep_alive_s + this), else it is closed.", gt=0)
    body_timeout_s: float = setting(30.0, "A request body must arrive completely within this time after its headers, else 408 and the connection is closed.", gt=0)
    keep_alive_s: float = setting(5.0, "Idle time a kept-alive connection may wait for its next request.", gt=0)
    drain_s: float = setting(10.0, "On SIGTERM/SIGINT: stop accepting, let running requests finish for at most this long, then close the rest and exit.", ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = setting("info", "uvicorn log level.")
    access_log: bool = setting(False, "Log every request (costs throughput).")

    def validate(self, prefix: str = "--") -> None:
        """Raise RecipeError (a ValueError) naming the first setting out of range.

        Args:
            prefix: ``"--"`` names flags in the message (``--max-queue``); else ``prefix.field``.
        """
        check_ranges(self, prefix)


__all__ = ["ServeConfig"]
