"""Load test of ``slimtune serve``: dynamic batching vs one-request-one-forward, side by side.

Starts two servers on free loopback ports from the same model folder, one with dynamic batching
(``--max-batch-size 32``) and one with ``--max-batch-size 1``, then sends single-text requests
(real SST-2 test sentences) at a fixed concurrency with httpx. Rounds alternate between the two
servers (rotating who goes first), so CPU drift hits both alike. Bounded by request count and by
a wall-clock limit. Also times the bare model (slimtune.benchmark.latency.measure_latency) at batch 1 vs
batch 32 per row, the ceiling that batching can reach.

    flock /tmp/slimtune-heavy.lock python bench/serve_load.py --model /work/artifacts/minilm-sst2

Prints a Markdown table; writes ``serve_load.json`` (and the server logs) to ``--output``.
Loopback only: the servers bind 127.0.0.1 and the client talks to nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def read_texts(path: str, n: int) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    col = header.index("sentence") if "sentence" in header else 0
    texts = [ln.split("\t")[col] for ln in lines[1:] if ln.strip()]
    return (texts * (n // max(len(texts), 1) + 1))[:n]


def start_server(model: str, max_batch: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slimtune.cli.main", "serve", "--model", model, "--host", HOST, "--port", str(port),
           "--max-batch-size", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device != "cpu":
        cmd += ["--device", args.device]
    cmd += ["--forward-cost-tokens", str(args.forward_cost_tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://{HOST}:{port}"


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    async with httpx.AsyncClient() as c:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server for {url} exited with {proc.returncode}; see its log")
            try:
                if (await c.get(f"{url}/healthz", timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bool]:
    """Send one pre-encoded HTTP/1.1 request on a keep-alive connection; (status, server closes)."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")  # status line + headers
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdr = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    await reader.readexactly(int(hdr.get("content-length", "0")))
    return status, hdr.get("connection", "").lower() == "close"


async def load(url: str, texts: list[str], concurrency: int, deadline: float) -> dict[str, Any]:
    """Send one request per text, ``concurrency`` at a time; stop early at ``deadline``.

    A minimal HTTP/1.1 client on raw asyncio streams (one keep-alive connection per worker,
    request bytes built before the clock starts): the load generator shares the 2 cores with the
    server, and a full client library (httpx: ~1-2 ms of CPU per request) would take cycles from
    the server it measures, penalising the faster mode most.
    """
    host, port = url.removeprefix("http://").split(":")
    lat: list[float] = []
    status: dict[str, int] = {}
    raws = []
    for t in texts:
        body = json.dumps({"texts": [t]}).encode()
        raws.append(b"POST /v1/classify HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json"
                    b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    nxt = iter(range(len(texts)))

    async def worker() -> None:
        conn = None
        for i in nxt:
            if time.time() > deadline:
                break
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, int(port))
                code, closes = await asyncio.wait_for(_post(*conn, raws[i]), timeout=60)
                key = str(code)
                if closes:
                    conn[1].close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                key = type(e).__name__
                if conn is not None:
                    conn[1].close()
                conn = None
            lat.append((time.perf_counter() - t0) * 1000)
            status[key] = status.get(key, 0) + 1
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"lat": lat, "status": status, "wall": wall}


async def scrape(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{url}/metrics")).text
    out = {}
    for name in ("slimtune_batch_size_sum", "slimtune_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    out["server_5xx"] = sum(float(v) for v in re.findall(r'^slimtune_requests_total\{[^}]*status="5\d\d"\} (\S+)$', text, re.M))
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def model_only(model: str, threads: int | None, texts: list[str], bs: int, forward_cost: int,
               device: str = "cpu") -> dict[str, Any]:
    """Bare-model ceiling on the load test's own texts: ms per text run one by one vs gathered
    ``bs`` at a time (sorted and split by length as the server does). No HTTP, no queue. The model
    is loaded by the server's own loader, so any backend it serves (torch, ONNX Runtime,
    quantized) is measured the way it is served."""
    from slimtune.serve.batching import split_by_length
    from slimtune.serve.models import load_runner, pad_batch

    runner = load_runner(model, threads, device)
    tok = runner.tokenizer
    encs = [dict(tok(t, truncation=True, max_length=runner.max_length)) for t in texts]
    pad = tok.pad_token_id or 0

    def fwd(rows: list[dict]) -> None:
        runner.logits(pad_batch(rows, pad))

    fwd(encs[:1])
    fwd(encs[:bs])  # warm-up
    t0 = time.perf_counter()
    for e in encs:
        fwd([e])
    one = (time.perf_counter() - t0) * 1000 / len(encs)
    t0, forwards = time.perf_counter(), 0
    for s in range(0, len(encs), bs):
        group = sorted(encs[s:s + bs], key=lambda e: len(e["input_ids"]))
        for a, b in split_by_length([len(e["input_ids"]) for e in group], forward_cost, bs):
            fwd(group[a:b])
            forwards += 1
    many = (time.perf_counter() - t0) * 1000 / len(encs)
    return {"backend": runner.backend, "device": device, "texts": len(encs),
            "mean_tokens": sum(len(e["input_ids"]) for e in encs) / len(encs),
            "one_by_one_ms_per_text": one, "batched_ms_per_text": many, "batched_forwards": forwards,
            "ceiling": one / many}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_texts(args.data, args.requests)
    modes = {"dynamic batching": args.max_batch_size, "one request, one forward": 1}
    servers = {name: start_server(args.model, mb, args, out / f"server-bs{mb}.log") for name, mb in modes.items()}
    results: dict[str, dict[str, Any]] = {n: {"lat": [], "status": {}, "wall": 0.0} for n in modes}
    try:
        for proc, url in servers.values():
            await wait_healthy(url, proc)
            await load(url, texts[:64], args.concurrency, time.time() + 60)  # warm-up, not counted
        deadline = time.time() + args.time_limit
        per_round = len(texts) // args.rounds
        for r in range(args.rounds):
            names = list(modes)[r % 2:] + list(modes)[:r % 2]
            for name in names:
                chunk = texts[r * per_round:(r + 1) * per_round]
                res = await load(servers[name][1], chunk, args.concurrency, deadline)
                acc = results[name]
                acc["lat"] += res["lat"]
                acc["wall"] += res["wall"]
                for k, v in res["status"].items():
                    acc["status"][k] = acc["status"].get(k, 0) + v
        summary = {}
        for name, acc in results.items():
            m = await scrape(servers[name][1])
            n = len(acc["lat"])
            s5 = sum(v for k, v in acc["status"].items() if k.startswith("5"))
            summary[name] = {"max_batch_size": modes[name], "requests": n, "ok": acc["status"].get("200", 0),
                             "5xx": s5, "other_errors": n - acc["status"].get("200", 0) - s5,
                             "status_counts": acc["status"], "wall_s": acc["wall"],
                             "req_per_s": n / acc["wall"] if acc["wall"] else 0.0,
                             "p50_ms": statistics.median(acc["lat"]) if n else float("nan"),
                             "p99_ms": percentile(acc["lat"], 0.99),
                             "mean_batch_rows": m["slimtune_batch_size_sum"] / max(m["slimtune_batch_size_count"], 1),
                             "server_5xx_total": m["server_5xx"]}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/work/artifacts/minilm-sst2")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/test.tsv"))
    ap.add_argument("--requests", type=int, default=2000, help="per mode")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--forward-cost-tokens", type=int, default=32, help="server's batch-splitting cost (0: never split)")
    ap.add_argument("--threads", type=int, default=1,
                    help="server intra-op threads (1: the other core is left to the event loop and client)")
    ap.add_argument("--device", default="cpu", help="where both servers run the model: cpu, cuda or cuda:N "
                                                    "(on a GPU a forward pass costs far more than a few padded "
                                                    "tokens: raise --forward-cost-tokens)")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the measured rounds, all modes")
    ap.add_argument("--skip-model-only", action="store_true")
    ap.add_argument("--output", default="/work/artifacts/serve-load")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from slimtune.benchmark.timing import hardware_fingerprint

    bare = None
    if not args.skip_model_only:
        bare = model_only(args.model, args.threads, read_texts(args.data, 256), args.max_batch_size,
                          args.forward_cost_tokens, args.device)
    try:  # the server picks uvloop + httptools up through uvicorn; the client uses uvloop too
        import uvloop

        summary = uvloop.run(main_async(args))
    except ImportError:
        summary = asyncio.run(main_async(args))
    a, b = summary["dynamic batching"], summary["one request, one forward"]
    print(f"\nLoad test: {args.requests} single-text requests per mode at concurrency {args.concurrency}, "
          f"loopback, {args.rounds} alternating rounds; model {args.model}\n")
    print("| mode | max batch | requests | 200 | 5xx | other | req/s | p50 ms | p99 ms | mean rows/forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['max_batch_size']} | {s['requests']} | {s['ok']} | {s['5xx']} | {s['other_errors']} | "
              f"{s['req_per_s']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['mean_batch_rows']:.1f} |")
    ratio = a["req_per_s"] / b["req_per_s"] if b["req_per_s"] else float("nan")
    print(f"\nthroughput ratio (batching / one-by-one): **{ratio:.2f}x**; p50 latency ratio "
          f"{b['p50_ms'] / a['p50_ms']:.2f}x lower with batching")
    if bare:
        print(f"\nbare model on {bare['texts']} of these texts ({bare['mean_tokens']:.1f} tokens on average), no HTTP: "
              f"{bare['one_by_one_ms_per_text']:.2f} ms/text one by one, {bare['batched_ms_per_text']:.2f} ms/text "
              f"batched by {args.max_batch_size} ({bare['batched_forwards']} forwards) = ceiling {bare['ceiling']:.2f}x")
    record = {"args": vars(args), "summary": summary, "ratio_req_per_s": ratio, "model_only": bare,
              "hardware": hardware_fingerprint()}
    Path(args.output, "serve_load.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {Path(args.output, 'serve_load.json')}")


if __name__ == "__main__":
    main()
