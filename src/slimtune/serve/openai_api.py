"""The OpenAI-compatible endpoints of ``slimtune serve`` (causal LMs).

- ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template
  (:func:`slimtune.runtime.generate.prompt_ids`, what ``slimtune generate`` and SFT use);
- ``POST /v1/completions``: text continues each ``prompt`` (tokenized as ``/v1/generate`` does);
- ``GET /v1/models`` and ``GET /v1/models/{id}``: the one id clients pass as ``model``
  (``--model-id``, default the folder's name); another id gets 404 ``model_not_found``.

Both POST endpoints answer as OpenAI does (``choices``, ``finish_reason`` ``stop``/``length``,
``usage``), or with ``stream: true`` as server-sent events: ``data: {chunk}`` lines in OpenAI's
chunk format (chat: a first ``role`` delta, then ``content`` deltas, then one with the
``finish_reason``), a last chunk with ``usage`` when ``stream_options.include_usage``, then
``data: [DONE]``. A streamed request is not answered until its first token exists, so queueing
and prompt errors still get a real HTTP status. ``usage.prompt_tokens`` counts the prompt's
tokens; ``completion_tokens`` the generated tokens (an EOS that ended the answer not counted).

Requests become sequences of the continuous-batching engine (:mod:`slimtune.serve.engine`);
schemas and field rules are :mod:`slimtune.serve.openai_schemas`. Top-level imports are stdlib
and slimtune only (FastAPI is the serve extra, imported where used).
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from slimtune.runtime.generate import SamplingConfig, prompt_ids
from slimtune.serve.engine import Engine, Event, Handle
from slimtune.serve.errors import ClientError
from slimtune.serve.models import Runner
from slimtune.serve.openai_schemas import message_dicts, openai_schemas, stop_list
from slimtune.serve.settings import ServeConfig

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # engine reason -> OpenAI's


def _prompts_of(body: Any, runner: Runner, chat: bool) -> list[list[int]]:
    """Token ids of each prompt of a validated request (ClientError 400 for an empty or bad one)."""
    tok = runner.tokenizer
    if chat:
        try:
            return [prompt_ids(tok, message_dicts(body.messages))]
        except ValueError as e:  # the chat template refused these messages (DataError)
            raise ClientError(400, "invalid_messages", str(e), param="messages") from None
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        p = [p]
    out = [list(x) if not isinstance(x, str) else list(tok(x)["input_ids"]) for x in p]
    vocab = len(tok)
    for ids in out:
        if not ids:
            raise ClientError(400, "empty_prompt", "the prompt has no tokens", param="prompt")
        if max(ids) >= vocab:
            raise ClientError(400, "invalid_token", f"token id {max(ids)} is outside the vocabulary "
                              f"(0 .. {vocab - 1})", param="prompt")
    return out


def _sampling(body: Any, prompts: list[list[int]], runner: Runner, cfg: ServeConfig, chat: bool) -> SamplingConfig:
    """The engine's settings for a request; 400 ``context_length_exceeded`` when a prompt leaves no room."""
    context = runner.lm.context_length
    longest = max(len(p) for p in prompts)
    default = cfg.max_new_tokens if chat else min(16, cfg.max_new_tokens)  # OpenAI's completions default: 16
    want = body.max_tokens if body.max_tokens is not None else default
    room = context - longest
    if room < 1:
        raise ClientError(400, "context_length_exceeded", f"this model's context is {context} tokens and the "
                          f"prompt has {longest}", param="messages" if chat else "prompt")
    if body.max_tokens is not None and longest + body.max_tokens > context:
        raise ClientError(400, "context_length_exceeded", f"this model's context is {context} tokens; the prompt "
                          f"has {longest} and max_tokens asks for {want}", param="max_tokens")
    return SamplingConfig(max_new_tokens=min(want, room),
                          temperature=float(1.0 if body.temperature is None else body.temperature),
                          top_p=float(1.0 if body.top_p is None else body.top_p), stop=stop_list(body.stop),
                          seed=body.seed)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice(chat: bool, index: int, text: str | None, finish: str | None, delta: dict | None = None) -> dict[str, Any]:
    """One entry of ``choices``: a message (chat), a delta (chat streams) or a text (completions)."""
    out: dict[str, Any] = {"index": index}
    if chat and delta is not None:
        out["delta"] = delta
    elif chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text or ""
    return {**out, "logprobs": None, "finish_reason": finish}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class _Reply:
    """What one request's answer carries: id, kind, model id, the sequences and their texts."""

    def __init__(self, chat: bool, model_id: str, n: int):
        self.chat, self.model_id, self.n = chat, model_id, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts: list[str] = [""] * n
        self.ends: list[Event | None] = [None] * n  # each sequence's last event

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model_id, "system_fingerprint": None}

    def usage(self) -> dict[str, int]:
        ends = [e for e in self.ends if e is not None]
        return _usage(sum(e.prompt_tokens for e in ends), sum(e.completion_tokens for e in ends))

    def full(self) -> dict[str, Any]:
        """The non-streamed answer."""
        choices = [_choice(self.chat, i, self.texts[i], FINISH[e.finish_reason]) for i, e in enumerate(self.ends)]
        return {**self.head(), "object": "chat.completion" if self.chat else "text_completion",
                "choices": choices, "usage": self.usage()}


async def _collect(handle: Handle, reply: _Reply, timeout: float) -> dict[str, Any]:
    """Wait for every sequence to end (503 past ``timeout`` seconds, the sequences cancelled)."""
    deadline = time.monotonic() + timeout
    try:
        while any(e is None for e in reply.ends):
            tag, ev = await handle.next_event(max(0.0, deadline - time.monotonic()))
            if ev.error is not None:
                raise ev.error
            reply.texts[tag] += ev.text
            if ev.finish_reason is not None:
                reply.ends[tag] = ev
    finally:
        handle.cancel()  # no-op for sequences that ended
    return reply.full()


async def _stream(handle: Handle, reply: _Reply, first: tuple[int, Event], usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events of one request, from its first event on (module docstring)."""
    head = reply.head()
    try:
        if reply.chat:
            for i in range(reply.n):
                yield _sse({**head, "choices": [_choice(True, i, None, None, {"role": "assistant", "content": ""})],
                            **({"usage": None} if usage else {})})
        tag, ev = first
        while True:
            if ev.error is not None:
                yield _sse({"error": {"message": ev.error.message, "type": "server_error", "param": None,
                                      "code": ev.error.kind}})
                break
            if ev.finish_reason is not None:
                reply.ends[tag] = ev
            if ev.text or ev.finish_reason is not None:
                delta = ({"content": ev.text} if ev.text else {}) if reply.chat else None
                finish = FINISH[ev.finish_reason] if ev.finish_reason else None
                yield _sse({**head, "choices": [_choice(reply.chat, tag, ev.text, finish, delta)],
                            **({"usage": None} if usage else {})})
            if all(e is not None for e in reply.ends):
                if usage:
                    yield _sse({**head, "choices": [], "usage": reply.usage()})
                break
            tag, ev = await handle.next_event()
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()  # the client went away, or the answer is complete


def setup_openai_routes(app: Any, runner: Runner, engine: Engine, cfg: ServeConfig, model_id: str) -> None:
    """Add ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` (module docstring) to ``app``."""
    from fastapi.responses import StreamingResponse  # optional dependency (the serve extra)

    ChatRequest, CompletionRequest = openai_schemas(cfg)
    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "slimtune"}

    async def answer(body: Any, chat: bool) -> Any:
        if body.model != model_id:
            raise ClientError(404, "model_not_found", f"the model {body.model!r} does not exist here; this "
                              f"server serves {model_id!r} (GET /v1/models)", param="model")
        if runner.task != "causal-lm" or runner.lm is None:
            raise ClientError(400, "wrong_task", "this server runs a classifier: use POST /v1/classify")
        prompts = _prompts_of(body, runner, chat)
        handle = engine.submit(prompts, _sampling(body, prompts, runner, cfg, chat))
        reply = _Reply(chat, model_id, len(prompts))
        if not body.stream:
            return await _collect(handle, reply, cfg.request_timeout_s)
        try:
            first = await handle.next_event(cfg.request_timeout_s)
        except BaseException:
            handle.cancel()
            raise
        if first[1].error is not None:
            handle.cancel()
            raise first[1].error
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(handle, reply, first, usage), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatRequest) -> Any:  # type: ignore[valid-type]
        """OpenAI chat completion: the assistant's answer to ``messages``."""
        return await answer(body, chat=True)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest) -> Any:  # type: ignore[valid-type]
        """OpenAI (legacy) completion: text continuing each ``prompt``."""
        return await answer(body, chat=False)

    @app.get("/v1/models", tags=["openai"])
    async def models() -> dict[str, Any]:
        """The model id to pass as ``model``."""
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}", tags=["openai"])
    async def model(model: str) -> dict[str, Any]:
        """One model's card; 404 for an id this server does not serve."""
        if model != model_id:
            raise ClientError(404, "model_not_found", f"the model {model!r} does not exist here; this server "
                              f"serves {model_id!r}", param="model")
        return card


__all__ = ["FINISH", "setup_openai_routes"]
