"""Refusals of ``slimtune serve``: the :class:`ClientError` every layer raises and the JSON it becomes.

Two shapes, one per API family:

- slimtune's own endpoints (``/v1/classify``, ``/v1/generate``, ...):
  ``{"error": {"type": KIND, "message": ..., ...}}`` with ``KIND`` the short code
  (``unauthorized``, ``malformed_json``, ``overloaded``);
- the OpenAI-compatible endpoints (``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/models``): OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``type``
  one of OpenAI's (``invalid_request_error``, ``authentication_error``, ``server_error``) and
  ``code`` the short code, so the official clients raise their matching exceptions
  (``BadRequestError``, ``NotFoundError``, ...) with the server's message.

Top-level imports are stdlib only.
"""

from __future__ import annotations

from typing import Any

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class ClientError(Exception):
    """A request the server refuses: HTTP ``status``, a short ``kind``, a clear message, and (OpenAI
    endpoints) the request field at fault as ``param``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers, self.param = status, kind, message, headers, param


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is one of the OpenAI-compatible endpoints (``/v1/models/ID`` included)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, kind: str, message: str, path: str = "", param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """The JSON body of a refusal on ``path`` (module docstring: OpenAI's shape on its endpoints)."""
    if is_openai_path(path):
        return {"error": {"message": message, "type": openai_type(status), "param": param, "code": kind}}
    return {"error": {"type": kind, "message": message, **({"param": param} if param else {}), **extra}}


__all__ = ["OPENAI_PATHS", "ClientError", "error_body", "is_openai_path", "openai_type"]
