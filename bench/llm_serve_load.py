"""Load test of ``slimtune serve``'s OpenAI endpoint on a causal LM: continuous batching vs one at a time.

Starts ``slimtune serve`` on a free loopback port (one server at a time, so they never share the
CPU), and sends ``--requests`` chat completions (``POST /v1/chat/completions``, greedy,
``--max-tokens`` each) at ``--concurrency``, every second one streamed (server-sent events, with
``stream_options.include_usage``). Prompts are real movie reviews (``packaged:rotten-tomatoes``
test split) to summarise. Then the same client runs the first ``--baseline-requests`` prompts
against a server started with ``--max-batch-size 1``, which generates one request at a time
through the same engine (what serving without batching across requests costs).

Reported per mode: status counts (5xx must be 0), generated tokens/s (``usage`` tokens over the
wall time), requests/s, time to first token p50/p99 (streamed requests: first content chunk;
the non-streamed ones have no earlier token, their latency is reported beside it), latency
p50/p99, and from the server's ``/metrics`` the mean number of sequences per decode step. The
machine's load average before and after is recorded (the CPU is shared).

    nice python bench/llm_serve_load.py --model smollm2 --output bench/results/llm_serve_load.json

Loopback only: the server binds 127.0.0.1 and the client talks to nothing else.
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

import httpx

HOST = "127.0.0.1"
ASK = "Summarise this movie review in two sentences, then say whether it is positive or negative.\n\nReview: {}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def review_prompts(n: int) -> list[str]:
    """``n`` chat prompts built from the packaged rotten-tomatoes test split (cycled)."""
    from slimtune.data.packaged import dataset_path

    lines = Path(dataset_path("rotten-tomatoes", "test")).read_text(encoding="utf-8").splitlines()
    col = lines[0].split("\t").index("text")
    texts = [ln.split("\t")[col] for ln in lines[1:] if ln.strip()]
    return [ASK.format(texts[i % len(texts)]) for i in range(n)]


def start_server(args: argparse.Namespace, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slimtune.cli.main", "serve", "--model", args.model, "--host", HOST,
           "--port", str(port), "--max-batch-size", str(max_batch), "--max-new-tokens", str(args.max_tokens),
           "--model-id", "bench", "--request-timeout-s", "600", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://{HOST}:{port}"


async def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
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
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


async def one_request(c: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """Send one chat completion; time to first token, latency, status, completion tokens."""
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"stream": stream, "ttft": None, "tokens": 0}
    try:
        if not stream:
            r = await c.post(f"{url}/v1/chat/completions", json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
        else:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
            async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                out["status"] = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["status"] = "stream_error"
                    elif chunk.get("usage"):
                        out["tokens"] = chunk["usage"]["completion_tokens"]
                    elif out["ttft"] is None and any(ch["delta"].get("content") for ch in chunk["choices"]):
                        out["ttft"] = time.perf_counter() - t0
                if r.status_code != 200:
                    await r.aread()
    except (httpx.TransportError, json.JSONDecodeError, KeyError) as e:
        out["status"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """All prompts, ``concurrency`` in flight, odd-numbered ones streamed."""
    todo = iter(enumerate(prompts))
    results: list[dict[str, Any]] = []

    async def worker(c: httpx.AsyncClient) -> None:
        for i, p in todo:
            results.append(await one_request(c, url, p, max_tokens, stream=i % 2 == 1))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        before = (await c.get(f"{url}/metrics")).text
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = (await c.get(f"{url}/metrics")).text
    return {"results": results, "wall": wall, "metrics": (before, after)}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _metric(texts: tuple[str, str], name: str) -> float:
    """How much a counter of ``/metrics`` grew between the two scrapes."""
    vals = []
    for text in texts:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        vals.append(float(m.group(1)) if m else 0.0)
    return vals[1] - vals[0]


def summarise(run: dict[str, Any], max_batch: int) -> dict[str, Any]:
    res, wall, text = run["results"], run["wall"], run["metrics"]
    status: dict[str, int] = {}
    for r in res:
        status[str(r["status"])] = status.get(str(r["status"]), 0) + 1
    ttft = [r["ttft"] for r in res if r["stream"] and r["ttft"] is not None]
    lat = [r["latency"] for r in res]
    tokens = sum(r["tokens"] for r in res)
    steps = _metric(text, "slimtune_batch_size_count")
    return {"max_batch_size": max_batch, "requests": len(res), "streamed": sum(r["stream"] for r in res),
            "status_counts": status, "5xx": sum(v for k, v in status.items() if k.startswith("5")),
            "non_200": sum(v for k, v in status.items() if k != "200"), "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "req_per_s": round(len(res) / wall, 3),
            "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
            "ttft_p99_s": round(percentile(ttft, 0.99), 3) if ttft else None,
            "latency_p50_s": round(statistics.median(lat), 3), "latency_p99_s": round(percentile(lat, 0.99), 3),
            "decode_steps": int(steps),
            "mean_sequences_per_decode_step": round(_metric(text, "slimtune_batch_size_sum") / max(steps, 1), 2),
            "server_5xx_total": sum(float(v) for v in re.findall(
                r'^slimtune_requests_total\{[^}]*status="5\d\d"\} (\S+)$', text[1], re.M))}


async def run_mode(args: argparse.Namespace, max_batch: int, prompts: list[str], out: Path) -> dict[str, Any]:
    proc, url = start_server(args, max_batch, out / f"llm-server-bs{max_batch}.log")
    try:
        await wait_healthy(url, proc)
        await load(url, prompts[:2], 2, 4)  # warm-up, not counted (the metrics are differences over the run)
        return summarise(await load(url, prompts, args.concurrency, args.max_tokens), max_batch)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="model folder or packaged alias")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--baseline-requests", type=int, default=24, help="requests for the one-at-a-time server (0: skip)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32, help="the continuous-batching server's --max-batch-size")
    ap.add_argument("--threads", type=int, default=1, help="server intra-op threads (1: the other core is left to "
                                                           "the client; 2 threads on a shared 2-core CPU thrash)")
    ap.add_argument("--output", default="bench/results/llm_serve_load.json")
    ap.add_argument("--logs", default="/tmp/slimtune-llm-serve-load", help="folder for the servers' logs")
    args = ap.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    from slimtune.benchmark.timing import hardware_fingerprint

    prompts = review_prompts(args.requests)
    load_before = os.getloadavg()
    modes = {"continuous batching": asyncio.run(run_mode(args, args.max_batch_size, prompts, logs))}
    if args.baseline_requests:
        modes["one request at a time"] = asyncio.run(run_mode(args, 1, prompts[:args.baseline_requests], logs))
    print(f"\n{args.requests} chat completions (half streamed) at concurrency {args.concurrency}, greedy, "
          f"max_tokens {args.max_tokens}, model {args.model}, server threads {args.threads}\n")
    print("| mode | requests | 200 | 5xx | tokens/s | req/s | TTFT p50 s | TTFT p99 s | latency p50 s | "
          "latency p99 s | seqs/decode step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in modes.items():
        print(f"| {name} | {s['requests']} | {s['status_counts'].get('200', 0)} | {s['5xx']} | {s['tokens_per_s']} | "
              f"{s['req_per_s']} | {s['ttft_p50_s']} | {s['ttft_p99_s']} | {s['latency_p50_s']} | "
              f"{s['latency_p99_s']} | {s['mean_sequences_per_decode_step']} |")
    ratio = None
    if len(modes) == 2:
        a, b = modes.values()
        ratio = round(a["tokens_per_s"] / b["tokens_per_s"], 2) if b["tokens_per_s"] else None
        print(f"\ntokens/s, continuous batching / one at a time: **{ratio}x**")
    record = {"args": vars(args), "modes": modes, "tokens_per_s_ratio": ratio,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "hardware": hardware_fingerprint()}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
