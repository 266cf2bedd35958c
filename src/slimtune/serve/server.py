"""The HTTP server under ``slimtune serve``: uvicorn with a connection cap, header timeouts and a bounded drain.

uvicorn alone accepts every connection and waits for its headers forever: some thousands of
idle, half-sent requests exhaust the process's file descriptors and every new client gets an
empty reply. :func:`guarded_protocol` wraps uvicorn's HTTP protocol (httptools or h11) so that

- at most ``max_connections`` connections are open: at the cap, the connection that has waited
  longest for its request headers is closed to make room (a client that sends its request at
  once is never the one waiting longest), and only when none is waiting is the new one closed;
- request headers must be complete within ``header_timeout_s`` of the connection (or of the last
  response on a kept-alive connection, plus ``keep_alive_s``), and at most 64 KiB long;
- everything after the headers (API key, content type, body size and body timeout) is checked by
  the app's outer middleware (:class:`slimtune.serve.app._Guard`), before the body is read.

:func:`run_server` runs the app with it; on SIGTERM/SIGINT uvicorn stops accepting, closes idle
connections, lets running requests finish for ``drain_s`` and then cancels them and exits.

Top-level imports are stdlib only (uvicorn is the serve extra, imported where used).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from slimtune.serve.settings import ServeConfig

MAX_HEADER_BYTES = 64 * 1024  # request line + headers; h11 gets the same limit
# Listen backlog (the kernel caps it at net.core.somaxconn): uvicorn's 2048 overflows under a
# connect flood, and a dropped SYN costs a real client the kernel's 1 s retransmit.
BACKLOG = 4096

_log = logging.getLogger("slimtune.serve")


def guarded_protocol(base: type, cfg: ServeConfig) -> type:
    """A subclass of uvicorn HTTP protocol ``base`` enforcing ``cfg``'s connection cap and header timeouts.

    Args:
        base: ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`` or ``h11_impl.H11Protocol``
            (both keep ``self.cycle``, ``self.connections`` and ``on_response_complete``).
        cfg: The server settings (``max_connections``, ``header_timeout_s``, ``keep_alive_s``).

    Returns:
        The protocol class to pass as ``uvicorn.Config(http=...)``.
    """

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        """uvicorn's protocol plus a connection cap and a deadline for each request's headers."""

        # connections waiting for request headers, longest-waiting first (one class per server)
        waiting: OrderedDict[Any, None] = OrderedDict()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._seen_cycle: Any = None
            self._header_bytes = 0
            self._header_timer: Any = None
            self._wait_for_headers(cfg.header_timeout_s)
            if len(self.connections) > cfg.max_connections:
                self._make_room()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is not None:
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._close("request headers over 64 KiB")
                    return
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are parsed
                self._seen_cycle = self.cycle
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            pending = self.cycle is not None and self.cycle is not self._seen_cycle  # pipelined, parsed
            if not self.transport.is_closing() and not pending:
                self._wait_for_headers(cfg.keep_alive_s + cfg.header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        # --- helpers -------------------------------------------------------------------------

        def _wait_for_headers(self, timeout: float) -> None:
            self._stop_waiting()
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(timeout, self._close, "no complete request headers in time")
            self.waiting[self] = None  # the newest waiter goes last

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
                self.waiting.pop(self, None)

        def _close(self, why: str) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                _log.debug("closing connection from %s: %s", self.client, why)
                self.transport.close()

        def _make_room(self) -> None:
            """Close the connection waiting longest for its headers (this one if no other waits); O(1)."""
            victim = next(iter(self.waiting), self)  # this one (the newest) only when no other waits
            victim._close(f"{cfg.max_connections} connections open")

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def server_config(app: Any, cfg: ServeConfig) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with ``cfg``'s address, limits, timeouts and logging."""
    import uvicorn  # optional dependency (the serve extra)
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # optional (the serve extra)

    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log,
                          http=guarded_protocol(AutoHTTPProtocol, cfg), timeout_keep_alive=cfg.keep_alive_s,
                          timeout_graceful_shutdown=cfg.drain_s, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          backlog=BACKLOG)


def run_server(app: Any, cfg: ServeConfig) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then drain for at most ``cfg.drain_s`` seconds and return."""
    import uvicorn  # optional dependency (the serve extra)

    uvicorn.Server(server_config(app, cfg)).run()
