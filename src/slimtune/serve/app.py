"""``slimtune serve``: an HTTP inference API for any slimtune output folder, with batching.

One worker thread owns the model: classifiers are served by dynamic batching
(:mod:`slimtune.serve.batching`), causal LMs by continuous batching (:mod:`slimtune.serve.engine`);
request handlers (asyncio, FastAPI) validate the body, queue it and await the worker's answer.
The model folder is loaded behind one small Runner interface (:mod:`slimtune.serve.models`:
torch, ONNX Runtime or slimtune's quantized models; causal LMs as a decoder backend) and metrics
are kept in :mod:`slimtune.serve.metrics`. This module holds the HTTP app (slimtune's routes,
validation, errors, auth); the OpenAI-compatible routes are :mod:`slimtune.serve.openai_api`.
It re-exports the public names of the others (the settings are :mod:`slimtune.serve.settings`).

Top-level imports are stdlib only (``slimtune --help`` stays fast); FastAPI, torch and
onnxruntime are imported where used.
"""

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from slimtune.runtime.generate import SamplingConfig
from slimtune.serve.batching import Batcher
from slimtune.serve.engine import Engine
from slimtune.serve.errors import OPENAI_PATHS, ClientError, error_body, is_openai_path
from slimtune.serve.metrics import Metrics
from slimtune.serve.models import Runner, load_runner
from slimtune.serve.openai_api import FINISH, setup_openai_routes
from slimtune.serve.settings import ServeConfig

# --------------------------------------------------------------------------------------------
# HTTP app
# --------------------------------------------------------------------------------------------

ENDPOINTS = ("/v1/classify", "/v1/generate", *OPENAI_PATHS, "/healthz", "/metrics", "/docs", "/openapi.json")


PROTECTED = ("/v1/", "/metrics")  # need the API key (when one is set); /healthz, /docs never do
JSON_ENDPOINTS = ("/v1/classify", "/v1/generate", "/v1/chat/completions", "/v1/completions")


def key_ok(headers: dict[str, str], api_key: str | None) -> bool:
    """Whether ``X-API-Key: KEY`` or ``Authorization: Bearer KEY`` carries ``api_key`` (constant time)."""
    if api_key is None:
        return True
    given = headers.get("x-api-key") or ""
    if not given and headers.get("authorization", "").lower().startswith("bearer "):
        given = headers["authorization"][7:].strip()
    return bool(given) and hmac.compare_digest(given.encode(), api_key.encode())


def _refusal(scope: dict, cfg: ServeConfig) -> tuple[int, str, str, dict[str, str]] | None:
    """What the request line and headers alone refuse (401, 415, 413), before one body byte is read."""
    path, method = scope.get("path", ""), scope.get("method", "GET")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if path.startswith(PROTECTED) and not key_ok(headers, cfg.api_key):
        return (401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY')",
                {"www-authenticate": "Bearer"})
    ctype = headers.get("content-type")
    if method == "POST" and path in JSON_ENDPOINTS and ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return 415, "unsupported_media_type", f"content-type {media!r}: send application/json", {}
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > cfg.max_body_bytes:
        return 413, "body_too_large", f"request body of {int(length)} bytes exceeds {cfg.max_body_bytes}", {}
    return None


class _Guard:
    """Outermost ASGI middleware: refusals from the headers alone (API key 401, content type 415,
    declared size 413) before the body is read; the body read with a size cap (413 as soon as it
    is passed) and a deadline (408); per-request metrics; a last-resort 500 JSON.

    A refusal that leaves body bytes unread closes the connection (``connection: close``), so no
    request body is ever buffered for a client that may not send one."""

    def __init__(self, app: Any, metrics: Metrics, cfg: ServeConfig):
        self.app, self.metrics, self.cfg = app, metrics, cfg

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]  # 0: no response started yet
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        self.metrics.in_flight += 1

        async def send_wrapped(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                self.metrics.request(endpoint, msg["status"], time.perf_counter() - t0)
            await send(msg)

        try:
            refused = _refusal(scope, self.cfg)
            if refused is not None:
                code, kind, message, headers = refused
                return await _send_json(send_wrapped, code, kind, message, headers, close=True, path=path)
            body = await self._read_body(receive, send_wrapped, path)
            if body is None:  # refused or disconnected; answered already
                return
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive_replay() -> dict:
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_replay, send_wrapped)
        except Exception:
            logging.getLogger("slimtune.serve.app").exception("unhandled error on %s", path)
            if not status[0]:
                await _send_json(send_wrapped, 500, "internal_error", "unexpected server error", path=path)
        finally:
            self.metrics.in_flight -= 1

    async def _read_body(self, receive: Any, send: Any, path: str = "") -> bytes | None:
        """The whole body, or None after answering 413 (over the cap) / 408 (too slow) / a disconnect."""
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.cfg.body_timeout_s
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await _send_json(send, 408, "body_timeout", f"request body not received within "
                                 f"{self.cfg.body_timeout_s:g} s", close=True, path=path)
                return None
            if msg["type"] == "http.disconnect":
                return None
            size += len(msg.get("body", b""))
            if size > self.cfg.max_body_bytes:
                await _send_json(send, 413, "body_too_large", f"request body exceeds {self.cfg.max_body_bytes} bytes",
                                 close=True, path=path)
                return None
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        return b"".join(chunks)


async def _send_json(send: Any, status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                     close: bool = False, path: str = "") -> None:
    body = json.dumps(error_body(status, kind, message, path)).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:  # body bytes may be left unread: uvicorn closes the connection after this response
        extra.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def _schemas(cfg: ServeConfig) -> tuple[Any, Any]:
    """Pydantic request models carrying this server's limits (so /docs shows the real ones)."""

    from pydantic import (  # optional dependency (the serve extra)
        BaseModel,
        ConfigDict,
        Field,
        StrictFloat,
        StrictInt,
        StringConstraints,
        model_validator,
    )

    Text = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=cfg.max_chars,
                                            pattern=r"\S")]  # \S: whitespace-only counts as empty

    class ClassifyRequest(BaseModel):
        """Exactly one of ``texts`` or ``pairs`` (sentence-pair models)."""

        model_config = ConfigDict(extra="forbid")
        texts: list[Text] | None = Field(None, min_length=1, max_length=cfg.max_texts,
                                         examples=[["a gripping, funny film", "dull and far too long"]])
        pairs: list[tuple[Text, Text]] | None = Field(None, min_length=1, max_length=cfg.max_texts)

        @model_validator(mode="after")
        def _one_of(self) -> "ClassifyRequest":
            if (self.texts is None) == (self.pairs is None):
                raise ValueError("give exactly one of 'texts' or 'pairs'")
            return self

    class GenerateRequest(BaseModel):
        """Greedy by default; ``temperature`` > 0 samples (nucleus ``top_p``)."""

        model_config = ConfigDict(extra="forbid")
        prompt: Text
        max_new_tokens: StrictInt = Field(min(32, cfg.max_new_tokens), ge=1, le=cfg.max_new_tokens)
        temperature: StrictFloat | StrictInt = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
        top_p: StrictFloat | StrictInt = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)

    return ClassifyRequest, GenerateRequest


def create_app(runner: Runner, cfg: ServeConfig | None = None, model_name: str = "model") -> Any:
    """The ASGI app (FastAPI) serving ``runner``; its worker starts/stops with the app's lifespan.

    Args:
        runner: The loaded model (:func:`slimtune.serve.models.load_runner`).
        cfg: Limits and batching (default ``ServeConfig()``); validated here.
        model_name: The name answers and ``/healthz`` report; the OpenAI model id unless
            ``cfg.model_id`` is set.

    Returns:
        The FastAPI app: ``/v1/classify``, ``/v1/generate``, ``/v1/chat/completions``,
        ``/v1/completions``, ``/v1/models``, ``/healthz``, ``/metrics``, ``/docs``.
    """
    cfg = cfg or ServeConfig()
    cfg.validate()
    metrics = Metrics()
    engine = Engine(runner.lm, cfg, metrics) if runner.lm is not None else None
    worker = engine if engine is not None else Batcher(runner, cfg, metrics)
    app = _setup_app(runner, cfg, worker, metrics, model_name)
    _setup_error_handlers(app)
    _setup_inference_routes(app, runner, cfg, worker, model_name)
    setup_openai_routes(app, runner, engine, cfg, cfg.model_id or model_name)
    _setup_ops_routes(app, runner, worker, metrics, model_name)
    app.add_middleware(_Guard, metrics=metrics, cfg=cfg)  # checks the API key before the body is read
    return app


def _setup_app(runner: Runner, cfg: ServeConfig, worker: Batcher | Engine, metrics: Metrics, model_name: str) -> Any:
    """The bare FastAPI app whose lifespan starts and stops the worker thread."""

    from fastapi import FastAPI  # optional dependency (the serve extra)

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        worker.start()
        yield
        worker.stop()

    how = (f"continuous batching (up to {cfg.max_batch_size} sequences)" if isinstance(worker, Engine) else
           f"dynamic batching (max batch {cfg.max_batch_size}, max wait {cfg.max_wait_ms} ms)")
    app = FastAPI(title="slimtune serve", version="1", lifespan=lifespan,
                  description=f"{runner.task} model `{model_name}` on {runner.backend}, {how}.")
    app.state.worker, app.state.metrics, app.state.cfg = worker, metrics, cfg
    app.state.batcher = worker  # the older name (a Batcher or an Engine: both have depth/alive)
    return app


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None, path: str = "",
           param: str | None = None, **extra: Any) -> Any:
    """The JSON error every refusal uses (:func:`slimtune.serve.errors.error_body`: OpenAI's shape on its paths)."""

    from fastapi.responses import JSONResponse  # optional dependency (the serve extra)

    return JSONResponse(error_body(status, kind, message, path, param, **extra), status, headers=headers)


def _param(loc: tuple) -> str | None:
    """The request field a validation error is about (``messages.0.content``), without pydantic's
    union-member tags."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int) or (isinstance(p, str) and p.isidentifier()):
            parts.append(str(p))
        else:
            break
    return ".".join(parts) or None


def _setup_error_handlers(app: Any) -> None:
    """ClientError, request validation (400 malformed JSON, 422 otherwise; 400 on the OpenAI
    endpoints, as OpenAI answers) and HTTP errors as JSON."""

    from fastapi import Request  # optional dependency (the serve extra)
    from fastapi.exceptions import RequestValidationError  # optional dependency (the serve extra)
    from starlette.exceptions import HTTPException  # optional dependency (the serve extra)

    @app.exception_handler(ClientError)
    async def _client_error(r: Request, e: ClientError) -> Any:
        return _error(e.status, e.kind, e.message, e.headers, r.url.path, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(r: Request, e: RequestValidationError) -> Any:
        errors, path = e.errors(), r.url.path
        if any(x.get("type") == "json_invalid" for x in errors):
            ctx = next(x.get("ctx", {}) for x in errors if x.get("type") == "json_invalid")
            return _error(400, "malformed_json", f"request body is not valid JSON ({ctx.get('error', 'decode error')})",
                          path=path)
        details = [{"loc": ".".join(str(p) for p in x.get("loc", ())), "msg": x.get("msg", "")} for x in errors]
        if is_openai_path(path):
            first = errors[0] if errors else {}
            msgs = [f"{_param(x.get('loc', ())) or 'body'}: {x.get('msg', '').removeprefix('Value error, ')}"
                    for x in errors[:3]]
            return _error(400, "invalid_request", "; ".join(msgs), path=path, param=_param(first.get("loc", ())))
        msg = "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5])
        return _error(422, "invalid_request", msg, errors=details)

    @app.exception_handler(HTTPException)
    async def _http(r: Request, e: HTTPException) -> Any:
        return _error(e.status_code, "http_error", str(e.detail), getattr(e, "headers", None), r.url.path)


def _asker(batcher: Batcher, cfg: ServeConfig) -> Any:
    """``await ask(rows)``: queue ``rows`` as one request and wait for the answer (503 on timeout)."""

    async def ask(rows: list[Any]) -> Any:
        fut = batcher.submit(rows)
        try:
            return await asyncio.wait_for(fut, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ClientError(503, "timeout", f"no answer within {cfg.request_timeout_s} s; retry later",
                              {"Retry-After": "1"}) from None

    return ask


async def _generate_one(engine: Engine, ids: list[int], sampling: SamplingConfig, timeout: float) -> dict[str, Any]:
    """``/v1/generate``'s answer: one sequence through the engine (503 past ``timeout``, then cancelled)."""
    handle = engine.submit([ids], sampling)
    deadline, text = time.monotonic() + timeout, ""
    try:
        while True:
            _, ev = await handle.next_event(max(0.0, deadline - time.monotonic()))
            if ev.error is not None:
                raise ev.error
            text += ev.text
            if ev.finish_reason is not None:
                return {"text": text, "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                        "finish_reason": FINISH[ev.finish_reason]}
    finally:
        handle.cancel()


def _setup_inference_routes(app: Any, runner: Runner, cfg: ServeConfig, worker: Batcher | Engine,
                            model_name: str) -> None:
    """``POST /v1/classify`` and ``POST /v1/generate`` (request schemas carry this server's limits;
    the API key, content type and body size were checked by :class:`_Guard`)."""
    ClassifyRequest, GenerateRequest = _schemas(cfg)
    ask = _asker(worker, cfg) if isinstance(worker, Batcher) else None

    @app.post("/v1/classify", tags=["inference"])
    async def classify(body: ClassifyRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Label and class probabilities for each text (or pair), in request order."""
        if runner.task != "classification":
            raise ClientError(400, "wrong_task", "this server runs a causal LM: use POST /v1/generate")
        rows = body.texts if body.texts is not None else [tuple(p) for p in body.pairs]
        return {"model": model_name, "results": await ask(rows)}

    @app.post("/v1/generate", tags=["inference"])
    async def generate(body: GenerateRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Continue ``prompt`` by up to ``max_new_tokens`` tokens."""
        if runner.task != "causal-lm":
            raise ClientError(400, "wrong_task", "this server runs a classifier: use POST /v1/classify")
        ids = runner.tokenizer(body.prompt)["input_ids"]
        budget = runner.max_length - body.max_new_tokens
        if len(ids) > budget:
            raise ClientError(422, "prompt_too_long", f"prompt has {len(ids)} tokens; at most {budget} fit "
                              f"with max_new_tokens={body.max_new_tokens}")
        sampling = SamplingConfig(max_new_tokens=body.max_new_tokens, temperature=float(body.temperature),
                                  top_p=float(body.top_p))
        return {"model": model_name, **(await _generate_one(worker, ids, sampling, cfg.request_timeout_s))}


def _setup_ops_routes(app: Any, runner: Runner, worker: Batcher | Engine, metrics: Metrics, model_name: str) -> None:
    """``GET /healthz`` (never needs the key) and ``GET /metrics`` (Prometheus text; the key, when set,
    is checked by :class:`_Guard`)."""
    from fastapi.responses import JSONResponse, PlainTextResponse  # optional (the serve extra)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Any:
        """200 while the model worker runs; 503 otherwise."""
        info = {"status": "ok" if worker.alive else "worker_down", "task": runner.task,
                "backend": runner.backend, "device": runner.device, "model": model_name, "queue_depth": worker.depth()}
        if isinstance(worker, Engine):
            info["live_sequences"] = worker.live()
        return JSONResponse(info, 200 if worker.alive else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Any:
        """Prometheus text format."""
        live = worker.live() if isinstance(worker, Engine) else None
        return PlainTextResponse(metrics.render(worker.depth(), live),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


__all__ = ["Batcher", "ClientError", "Metrics", "Runner", "ServeConfig", "create_app", "load_runner"]
