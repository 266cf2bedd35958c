"""``slimtune serve``: an HTTP inference API for any slimtune output folder, with dynamic batching.

One worker thread owns the model. Request handlers (asyncio, FastAPI) validate the body, put
one item on a bounded queue and await a future; the worker takes the first waiting item, keeps
collecting until ``max_batch_size`` rows are gathered or ``max_wait_ms`` has passed since that
first item *arrived* (so under load, when items already waited while the model was busy, it
never waits again), runs the rows as one padded forward pass (rows sorted by length) and routes
each row's result back to its caller's future. A full queue answers 503 with Retry-After at
once instead of growing memory. A batch that raises is retried one request at a time, so one
poisoned input fails alone and the worker never dies.

Backends (``load_runner``): plain transformers folders (fp32, pruned, fine-tuned) run in torch;
folders holding ``model.onnx`` run in ONNX Runtime. Both expose the same tiny Runner interface,
so the batcher and the HTTP layer never ask which one they have.

Top-level imports are stdlib only (``slimtune --help`` stays fast); FastAPI, torch and
onnxruntime are imported where used.
"""

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Server limits and batching settings (every field is a ``slimtune serve`` flag)."""

    max_batch_size: int = field(default=32, metadata={"help": "most rows (texts) per forward pass; 1 = no batching"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for others to join its batch"})
    max_queue: int = field(default=256, metadata={"help": "most requests waiting; more are refused with 503"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"})
    max_texts: int = field(default=64, metadata={"help": "most texts (or pairs) per classify request"})
    max_chars: int = field(default=4000, metadata={"help": "most characters per text or prompt"})
    max_new_tokens: int = field(default=256, metadata={"help": "upper bound on max_new_tokens for generate"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted (413 above)"})
    request_timeout_s: float = field(default=30.0, metadata={"help": "a request not answered by then gets 503"})
    threads: int | None = field(default=None, metadata={"help": "intra-op threads for torch / ONNX Runtime"})

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("max_batch_size", "max_queue", "max_texts", "max_chars", "max_new_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("--max-wait-ms must be >= 0 and --request-timeout-s > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


class ClientError(Exception):
    """A request the server refuses: HTTP ``status``, a short ``kind`` and a clear message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


# --------------------------------------------------------------------------------------------
# Runners: the model behind one small interface
# --------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """What the batcher needs from a model, whatever runs it.

    ``logits(batch)`` maps padded int64 arrays (``input_ids``, ``attention_mask``, maybe
    ``token_type_ids``; each (B, T)) to a float array (B, C); ``generate`` (causal LMs only)
    maps a left-padded batch to new token ids per row.
    """

    task: str  # "classification" | "causal-lm"
    backend: str  # "torch" | "onnxruntime"
    tokenizer: Any
    max_length: int  # tokens per text (classification) or prompt (causal-lm)
    label_names: list[str] = field(default_factory=list)
    multi_label: bool = False
    logits: Any = None  # Callable[[dict[str, np.ndarray]], np.ndarray]
    generate: Any = None  # Callable[[dict[str, np.ndarray], int, float, float], list[list[int]]]
    eos_ids: tuple[int, ...] = ()


def _config(model_dir: Path) -> dict[str, Any]:
    p = model_dir / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON ({e.msg}, line {e.lineno})") from None


def _label_names(cfg: dict[str, Any]) -> list[str]:
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    n = len(id2label) or int(cfg.get("num_labels", 2))
    return [id2label.get(i, f"LABEL_{i}") for i in range(n)]


def _max_length(model_dir: Path, cfg: dict[str, Any], tokenizer: Any) -> int:
    """The recipe's data.max_length if saved, else what the model and tokenizer allow (<= 512)."""
    recipe = model_dir / "recipe.yaml"
    if recipe.is_file():
        import yaml

        n = ((yaml.safe_load(recipe.read_text()) or {}).get("data") or {}).get("max_length")
        if isinstance(n, int) and n > 0:
            return n
    limits = [512, cfg.get("max_position_embeddings") or 512, getattr(tokenizer, "model_max_length", 512)]
    return int(min(x for x in limits if isinstance(x, int) and x > 0))


def _classifier(model_dir: Path, threads: int | None) -> Any:
    """``logits(batch)`` for a classifier folder.

    Prefers ``slimtune.quantize.load_classifier`` (one loader for every slimtune output: ONNX,
    quantized ``quantization.json`` folders, plain HF); falls back to torch / onnxruntime
    directly when that module is absent.
    """
    import numpy as np

    try:
        from slimtune.quantize import load_classifier
    except ImportError:
        load_classifier = None
    if load_classifier is not None:
        clf = load_classifier(model_dir, threads)  # (input_ids, attention_mask, token_type_ids) -> logits

        def logits_any(batch: dict[str, Any]) -> Any:
            out = clf(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
            return out.float().numpy() if hasattr(out, "numpy") else np.asarray(out)

        return logits_any
    if (model_dir / "model.onnx").is_file():
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out_names = [o.name for o in sess.get_outputs()]
        out_name = "logits" if "logits" in out_names else out_names[0]

        def logits_ort(batch: dict[str, Any]) -> Any:
            feed = {n: batch.get(n, np.zeros_like(batch["input_ids"])) for n in names}
            return np.asarray(sess.run([out_name], feed)[0], dtype=np.float32)

        return logits_ort
    import inspect

    import torch

    from slimtune.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(str(model_dir), "classification").eval()
    accepted = set(inspect.signature(model.forward).parameters)

    def logits_torch(batch: dict[str, Any]) -> Any:
        feed = {k: torch.from_numpy(v) for k, v in batch.items() if k in accepted}
        with torch.inference_mode():
            return model(**feed).logits.float().numpy()

    return logits_torch


def _torch_generator(model_dir: Path, threads: int | None, pad_id: int) -> Any:
    import torch

    from slimtune.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(str(model_dir), "causal-lm").eval()

    def generate(batch: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float) -> list[list[int]]:
        ids = torch.from_numpy(batch["input_ids"])
        kw: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kw)
        return out[:, ids.shape[1]:].tolist()  # (B, new) new tokens only (prompts are left-padded)

    return generate


def load_runner(model_dir: str, threads: int | None = None) -> Runner:
    """Load any slimtune output folder behind the Runner interface.

    Classifiers: ``model.onnx`` -> ONNX Runtime, ``quantization.json`` -> slimtune's quantized
    torch model, else transformers. Causal LMs (``architectures`` ending in ForCausalLM) run in
    transformers. Raises FileNotFoundError/ValueError
    with the folder named when it cannot be served.
    """
    from slimtune.evaluate import model_task
    from slimtune.models import load_tokenizer

    d = Path(model_dir)
    cfg = _config(d)
    task = model_task(str(d))
    tok = load_tokenizer(str(d))
    if task == "causal-lm":
        if (d / "model.onnx").is_file() and not (d / "model.safetensors").is_file():
            raise ValueError(f"{d}: serving ONNX causal LMs is not supported; serve the safetensors folder")
        tok.padding_side = "left"  # generation appends on the right
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids = tuple(dict.fromkeys([*eos_ids, tok.eos_token_id]))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        n_pos = cfg.get("max_position_embeddings") or 2048
        return Runner("causal-lm", "torch", tok, max_length=int(n_pos),
                      generate=_torch_generator(d, threads, pad), eos_ids=eos_ids)
    backend = ("onnxruntime" if (d / "model.onnx").is_file()
               else "torch-quantized" if (d / "quantization.json").is_file() else "torch")
    return Runner("classification", backend, tok, _max_length(d, cfg, tok),
                  label_names=_label_names(cfg),
                  multi_label=cfg.get("problem_type") == "multi_label_classification",
                  logits=_classifier(d, threads))


# --------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition, written by hand: no extra dependency)
# --------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lb = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{lb} {self.sum:.6f}", f"{name}_count{lb} {self.n}"]


class Metrics:
    """Request counts by endpoint/status, latency and batch-size histograms (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.batch_rows = _Histogram(BATCH_BUCKETS)
        self.forward_s = _Histogram(LATENCY_BUCKETS)
        self.batch_errors = 0
        self.in_flight = 0  # touched only on the event loop

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.forward_s.observe(seconds)

    def render(self, queue_depth: int) -> str:
        with self._lock:
            out = ["# HELP slimtune_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE slimtune_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'slimtune_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP slimtune_request_duration_seconds Time from request start to response start.",
                    "# TYPE slimtune_request_duration_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("slimtune_request_duration_seconds", f'endpoint="{ep}"')
            out += ["# HELP slimtune_batch_size Rows (texts or prompts) per forward pass.",
                    "# TYPE slimtune_batch_size histogram", *self.batch_rows.lines("slimtune_batch_size"),
                    "# HELP slimtune_forward_duration_seconds Time of one batched forward pass.",
                    "# TYPE slimtune_forward_duration_seconds histogram",
                    *self.forward_s.lines("slimtune_forward_duration_seconds"),
                    "# HELP slimtune_batch_errors_total Batches whose forward pass raised.",
                    "# TYPE slimtune_batch_errors_total counter", f"slimtune_batch_errors_total {self.batch_errors}",
                    "# HELP slimtune_queue_depth Requests waiting for the model.",
                    "# TYPE slimtune_queue_depth gauge", f"slimtune_queue_depth {queue_depth}",
                    "# HELP slimtune_requests_in_flight Requests being handled now.",
                    "# TYPE slimtune_requests_in_flight gauge", f"slimtune_requests_in_flight {self.in_flight}"]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Dynamic batching
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    rows: list[Any]  # classify: str or (str, str); generate: one dict of generation settings
    future: Any  # asyncio.Future resolved on its own loop
    loop: Any
    arrived: float


def _pad(encs: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, Any]:
    """Pad token lists to the longest row: {key: int64 array (B, T)} (pad id for input_ids, else 0)."""
    import numpy as np

    width = max(len(e["input_ids"]) for e in encs)
    out = {}
    for key in encs[0]:
        arr = np.full((len(encs), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for i, e in enumerate(encs):
            seq = e[key]
            if left:
                arr[i, width - len(seq):] = seq
            else:
                arr[i, :len(seq)] = seq
        out[key] = arr
    return out


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
                logging.getLogger("slimtune.serve").exception("batch of %d requests failed", len(batch))
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
        if self.runner.task == "classification":
            return self._classify(batch)
        return self._generate(batch)

    def _classify(self, batch: list[_Item]) -> list[list[dict[str, Any]]]:
        import numpy as np

        r, tok = self.runner, self.runner.tokenizer
        flat = [(i, j, row) for i, it in enumerate(batch) for j, row in enumerate(it.rows)]
        firsts = [row if isinstance(row, str) else row[0] for _, _, row in flat]
        seconds = None if isinstance(flat[0][2], str) else [row[1] for _, _, row in flat]
        enc = tok(firsts, seconds, truncation=True, max_length=r.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        encs = [{k: enc[k][n] for k in keys} for n in range(len(flat))]
        order = sorted(range(len(flat)), key=lambda n: len(encs[n]["input_ids"]))  # similar lengths together
        out: list[list[Any]] = [[None] * len(it.rows) for it in batch]
        for s in range(0, len(order), self.cfg.max_batch_size):
            chunk = order[s:s + self.cfg.max_batch_size]
            t0 = time.perf_counter()
            logits = np.asarray(r.logits(_pad([encs[n] for n in chunk], self.pad_id)), dtype=np.float64)  # (B, C)
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

    def _generate(self, batch: list[_Item]) -> list[dict[str, Any]]:
        r, tok = self.runner, self.runner.tokenizer
        out: list[Any] = [None] * len(batch)
        groups: dict[tuple[float, float], list[int]] = {}  # one generate() per sampling setting
        for i, it in enumerate(batch):
            s = it.rows[0]
            groups.setdefault((s["temperature"], s["top_p"] if s["temperature"] > 0 else 1.0), []).append(i)
        for (temp, top_p), idx in groups.items():
            encs = [{"input_ids": batch[i].rows[0]["ids"], "attention_mask": [1] * len(batch[i].rows[0]["ids"])}
                    for i in idx]
            n_new = max(batch[i].rows[0]["max_new_tokens"] for i in idx)
            t0 = time.perf_counter()
            new = r.generate(_pad(encs, self.pad_id, left=True), n_new, temp, top_p)
            self.metrics.batch(len(idx), time.perf_counter() - t0)
            for i, ids in zip(idx, new, strict=True):
                want = batch[i].rows[0]["max_new_tokens"]
                ids, reason = ids[:want], "length"
                for k, t in enumerate(ids):
                    if t in r.eos_ids:
                        ids, reason = ids[:k], "stop"
                        break
                out[i] = {"text": tok.decode(ids, skip_special_tokens=True), "prompt_tokens": len(encs[idx.index(i)]["input_ids"]),
                          "completion_tokens": len(ids), "finish_reason": reason}
        return out


# --------------------------------------------------------------------------------------------
# HTTP app
# --------------------------------------------------------------------------------------------

ENDPOINTS = ("/v1/classify", "/v1/generate", "/healthz", "/metrics", "/docs", "/openapi.json")


class _Guard:
    """Outermost ASGI middleware: body-size cap (413), per-request metrics, last-resort 500 JSON."""

    def __init__(self, app: Any, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

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
            body, more, size = [], True, 0  # read the body up front so oversized ones stop early
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                if size > self.max_body:
                    return await _send_json(send_wrapped, 413, "body_too_large",
                                            f"request body exceeds {self.max_body} bytes")
                body.append(msg.get("body", b""))
                more = msg.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

            async def receive_replay() -> dict:
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_replay, send_wrapped)
        except Exception:
            logging.getLogger("slimtune.serve").exception("unhandled error on %s", path)
            if not status[0]:
                await _send_json(send_wrapped, 500, "internal_error", "unexpected server error")
        finally:
            self.metrics.in_flight -= 1


async def _send_json(send: Any, status: int, kind: str, message: str) -> None:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _schemas(cfg: ServeConfig) -> tuple[Any, Any]:
    """Pydantic request models carrying this server's limits (so /docs shows the real ones)."""
    from typing import Annotated

    from pydantic import (
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
    """The ASGI app (FastAPI) serving ``runner``; the batcher starts/stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeConfig()
    cfg.validate()
    metrics = Metrics()
    batcher = Batcher(runner, cfg, metrics)
    ClassifyRequest, GenerateRequest = _schemas(cfg)

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="slimtune serve", version="1", lifespan=lifespan,
                  description=f"{runner.task} model `{model_name}` on {runner.backend}, dynamic batching "
                              f"(max batch {cfg.max_batch_size}, max wait {cfg.max_wait_ms} ms).")
    app.state.batcher, app.state.metrics, app.state.cfg = batcher, metrics, cfg

    def err(status: int, kind: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> Any:
        return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status, headers=headers)

    @app.exception_handler(ClientError)
    async def _client_error(_: Request, e: ClientError) -> Any:
        return err(e.status, e.kind, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Any:
        errors = e.errors()
        if any(x.get("type") == "json_invalid" for x in errors):
            ctx = next(x.get("ctx", {}) for x in errors if x.get("type") == "json_invalid")
            return err(400, "malformed_json", f"request body is not valid JSON ({ctx.get('error', 'decode error')})")
        details = [{"loc": ".".join(str(p) for p in x.get("loc", ())), "msg": x.get("msg", "")} for x in errors]
        msg = "; ".join(f"{d['loc']}: {d['msg']}" for d in details[:5])
        return err(422, "invalid_request", msg, errors=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> Any:
        return err(e.status_code, "http_error", str(e.detail), getattr(e, "headers", None))

    def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        h = request.headers
        given = h.get("x-api-key") or ""
        if not given and h.get("authorization", "").lower().startswith("bearer "):
            given = h["authorization"][7:].strip()
        if not given or not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ClientError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY')",
                              {"WWW-Authenticate": "Bearer"})

    async def run(rows: list[Any]) -> Any:
        fut = batcher.submit(rows)
        try:
            return await asyncio.wait_for(fut, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ClientError(503, "timeout", f"no answer within {cfg.request_timeout_s} s; retry later",
                              {"Retry-After": "1"}) from None

    @app.post("/v1/classify", dependencies=[Depends(auth)], tags=["inference"])
    async def classify(body: ClassifyRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Label and class probabilities for each text (or pair), in request order."""
        if runner.task != "classification":
            raise ClientError(400, "wrong_task", "this server runs a causal LM: use POST /v1/generate")
        rows = body.texts if body.texts is not None else [tuple(p) for p in body.pairs]
        return {"model": model_name, "results": await run(rows)}

    @app.post("/v1/generate", dependencies=[Depends(auth)], tags=["inference"])
    async def generate(body: GenerateRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Continue ``prompt`` by up to ``max_new_tokens`` tokens."""
        if runner.task != "causal-lm":
            raise ClientError(400, "wrong_task", "this server runs a classifier: use POST /v1/classify")
        ids = runner.tokenizer(body.prompt)["input_ids"]
        budget = runner.max_length - body.max_new_tokens
        if len(ids) > budget:
            raise ClientError(422, "prompt_too_long", f"prompt has {len(ids)} tokens; at most {budget} fit "
                              f"with max_new_tokens={body.max_new_tokens}")
        row = {"ids": ids, "max_new_tokens": body.max_new_tokens, "temperature": float(body.temperature),
               "top_p": float(body.top_p)}
        return {"model": model_name, **(await run([row]))}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Any:
        """200 while the model worker runs; 503 otherwise."""
        info = {"status": "ok" if batcher.alive else "worker_down", "task": runner.task,
                "backend": runner.backend, "model": model_name, "queue_depth": batcher.depth()}
        return JSONResponse(info, 200 if batcher.alive else 503)

    @app.get("/metrics", dependencies=[Depends(auth)], tags=["ops"], response_class=PlainTextResponse)
    async def prometheus() -> Any:
        """Prometheus text format."""
        return PlainTextResponse(metrics.render(batcher.depth()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Guard, metrics=metrics, max_body=cfg.max_body_bytes)
    return app


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def cmd_serve(args: Any) -> int:
    """Load the model, warm it up, and serve until interrupted."""
    import uvicorn

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"slimtune serve: {e}") from None
    runner = load_runner(args.model, cfg.threads)
    _warmup(runner)
    app = create_app(runner, cfg, model_name=Path(args.model).name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        logging.getLogger("slimtune").warning("serving on %s without --api-key", args.host)
    print(f"slimtune serve: {runner.task} ({runner.backend}) from {args.model} on http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def _warmup(runner: Runner) -> None:
    """One forward pass before the first request (first calls allocate and pick kernels)."""
    tok = runner.tokenizer
    if runner.task == "classification":
        runner.logits(_pad([dict(tok("warm up"))], tok.pad_token_id or 0))
    else:
        runner.generate(_pad([{"input_ids": tok("hi")["input_ids"], "attention_mask": [1] * len(tok("hi")["input_ids"])}],
                             tok.pad_token_id or 0, left=True), 1, 0.0, 1.0)


def add_cli(subparsers: Any) -> None:
    """Add ``slimtune serve``."""
    p = subparsers.add_parser("serve", help="HTTP inference API with dynamic batching (see docs/serving.md)")
    p.add_argument("--model", required=True, help="model folder written by slimtune (safetensors or model.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    for f in fields(ServeConfig):
        tp = {"threads": int, "api_key": str}.get(f.name) or type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=tp, default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")
    p.set_defaults(func=cmd_serve)


__all__ = ["Batcher", "ClientError", "Metrics", "Runner", "ServeConfig", "add_cli", "create_app", "load_runner"]
