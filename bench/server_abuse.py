"""Abuse test of ``slimtune serve``: hostile clients and a normal load at the same time, loopback only.

Starts ``slimtune serve`` on a free 127.0.0.1 port (a tiny random BERT classifier unless
``--model DIR``; the server is what is measured, not the model) with an API key and its
connection limits, then:

1. **quiet**: ``--requests`` normal classify requests at ``--concurrency`` (keep-alive);
2. **abuse**, for ``--abuse-seconds``: an idle-connection flood (``--idle`` connections that send
   half a request line and stop, reconnecting when closed, at most ``--idle-max-connects`` in
   all), ``--slow`` slow-body clients (valid key, a body trickled a few bytes a second) and
   ``--oversized`` unauthenticated clients that declare and start sending a 1 MB body; the
   same normal load runs **during** the abuse;
3. **SIGTERM** while ``--slow`` clients trickle bodies: seconds until the process exits
   (it must be within ``--drain-s`` plus a little).

Reported: status counts (5xx must be zero), normal clients' p50/p99 quiet vs under abuse
(``--rounds`` loads each, in a process of their own, median p99), the server's RSS (quiet, peak
under abuse), what happened to each kind of abuser, kernel TCP drop/retransmit counters during
the loads, the exit time. Exit status 0 when 5xx is zero, the median p99 is within 3x of quiet
and SIGTERM ended the server within ``--drain-s`` + 3 s.
The server runs with its open-file limit lowered to ``--server-nofile`` so the flood is larger
than its file table (an unprotected server would refuse every new client); the client raises
its own soft limit to the hard limit (``ulimit -n``) and sizes nothing above it.

    python bench/server_abuse.py                      # ~1-2 minutes on 2 CPUs
    python bench/server_abuse.py --idle 3000 --abuse-seconds 20 --output /tmp/abuse.json

Bounded in count (requests, connections) and time (``--max-seconds`` overall, every phase
has its own deadline); it targets only 127.0.0.1 and stops the server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # the only address this script ever connects to
KEY = "abuse-bench-key"
BODY = json.dumps({"texts": ["a good film"]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tiny_model(out: Path) -> Path:
    """A seeded random 2-layer BERT classifier with a 16-word WordPiece vocabulary (a few hundred KB)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a good bad film movie the is was not very".split()]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).save_pretrained(out)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(out)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def listen_drops() -> dict[str, int]:
    """Kernel TCP counters (machine-wide): SYNs dropped at a full accept queue, retransmissions, timeouts."""
    out: dict[str, int] = {}
    for path, prefix, keys in (("/proc/net/netstat", "TcpExt:", ("ListenOverflows", "ListenDrops", "TCPTimeouts")),
                               ("/proc/net/snmp", "Tcp:", ("RetransSegs",))):
        lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.startswith(prefix)]
        if len(lines) >= 2:
            table = dict(zip(lines[0][1:], lines[1][1:], strict=False))
            out.update({k: int(table[k]) for k in keys if k in table})
    return out


def request(length: int | None = None, key: str | None = KEY, body: bytes = b"") -> bytes:
    head = f"POST /v1/classify HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """The status of one response (its body read); 0 when the server closed first."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return status


# --------------------------------------------------------------------------------------------
# Normal clients
# --------------------------------------------------------------------------------------------


async def normal_load(port: int, n: int, concurrency: int, deadline: float) -> dict[str, Any]:
    """``n`` requests over ``concurrency`` keep-alive connections; latency and status of each.

    ``p50_ms``/``p99_ms`` include opening the connection where a request needed one (TCP connect
    under a SYN flood can wait for the kernel's 1 s SYN retry); ``p99_request_ms`` leaves the
    connect out; ``connect_ms_max`` is the slowest connect.
    """
    lat: list[float] = []
    req_lat: list[float] = []
    connects: list[float] = []
    slowest: list[tuple[float, float, bool]] = []  # (latency, start relative to the load's, first on its connection)
    statuses: dict[str, int] = {}
    errors = [0]
    todo = [n]

    async def worker() -> None:
        reader = writer = None
        while todo[0] > 0 and time.monotonic() < deadline:
            todo[0] -= 1
            t0 = time.perf_counter()
            try:
                first = writer is None
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
                    connects.append(time.perf_counter() - t0)
                t1 = time.perf_counter()
                writer.write(request(body=BODY))
                status = await asyncio.wait_for(read_response(reader), 30)
                req_lat.append(time.perf_counter() - t1)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors[0] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            lat.append(time.perf_counter() - t0)
            slowest.append((lat[-1], t0 - start, first))
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        if writer is not None:
            writer.close()

    t0, start = time.monotonic(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    qr = statistics.quantiles(req_lat, n=100) if len(req_lat) >= 2 else [float("nan")] * 99
    return {"requests": len(lat), "errors": errors[0], "statuses": statuses, "seconds": round(time.monotonic() - t0, 2),
            "p50_ms": round(q[49] * 1e3, 2), "p99_ms": round(q[98] * 1e3, 2), "p99_request_ms": round(qr[98] * 1e3, 2),
            "connects": len(connects), "connect_ms_max": round(max(connects) * 1e3, 1) if connects else None,
            "slowest": [(round(a * 1e3, 1), round(b, 3), c) for a, b, c in sorted(slowest, reverse=True)[:12]]}


def normal_load_in_process(port: int, n: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """:func:`normal_load` in a process of its own: normal clients share no event loop (or CPU queue)
    with the abusers, as on a real network."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_normal_load_sync, port, n, concurrency, seconds).result(timeout=seconds + 60)


def _normal_load_sync(port: int, n: int, concurrency: int, seconds: float) -> dict[str, Any]:
    try:  # normal clients at normal priority even when the abusers run niced (--abuser-nice)
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass
    return asyncio.run(normal_load(port, n, concurrency, time.monotonic() + seconds))


# --------------------------------------------------------------------------------------------
# Abusers
# --------------------------------------------------------------------------------------------


async def idle_flood(port: int, n: int, max_connects: int, delay: float, stop: asyncio.Event,
                     stats: dict[str, int]) -> None:
    """Keep ``n`` connections that sent half a request line; reconnect 0.5-1.5 x ``delay`` s (seeded
    jitter: a steady flood, not synchronised waves) after the server closes one."""
    rng = random.Random(0)
    partial = f"POST /v1/classify HTTP/1.1\r\nHost: {HOST}\r\n".encode()

    async def one() -> None:
        while not stop.is_set() and stats["idle_connects"] < max_connects:
            stats["idle_connects"] += 1
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
                writer.write(partial)
                done = asyncio.ensure_future(reader.read(1))  # b"": the server closed it
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if done.done():
                    stats["idle_closed_by_server"] += 1
                done.cancel()
                stopped.cancel()
                writer.close()
                await asyncio.sleep(delay * (0.5 + rng.random()))
            except (OSError, asyncio.TimeoutError):
                stats["idle_connect_errors"] += 1
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(n)))


async def slow_body(port: int, stop: asyncio.Event, outcomes: dict[str, int]) -> None:
    """Valid key, a 100 kB body declared, 8 bytes sent every 0.5 s until the server answers or closes."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
        writer.write(request(length=100_000))
        answer = asyncio.ensure_future(read_response(reader))
        while not answer.done() and not stop.is_set():
            writer.write(b"x" * 8)
            await asyncio.sleep(0.5)
        if not answer.done():
            key = "still open at the end"
        elif answer.exception() is not None:
            key = "closed by the server"
        else:
            key = f"status {answer.result()}"
        answer.cancel()
        writer.close()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        key = "connection error"
    outcomes[key] = outcomes.get(key, 0) + 1


async def oversized(port: int, outcomes: dict[str, int], seconds: list[float]) -> None:
    """No key, 1 MB declared, then as much of it as the server takes; time to the answer."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, asyncio.TimeoutError):
        outcomes["connect error"] = outcomes.get("connect error", 0) + 1
        return
    writer.write(request(length=1_000_000, key=None))
    answer = asyncio.ensure_future(read_response(reader))
    try:
        for _ in range(16):  # 16 x 64 KiB = 1 MiB, stopping at the answer
            if answer.done():
                break
            writer.write(b"x" * 65536)
            await writer.drain()
            await asyncio.sleep(0.05)
        status = await asyncio.wait_for(answer, 20)
        key = f"status {status}"
    except (OSError, asyncio.IncompleteReadError):  # answered and closed while we wrote: the reset drops the 401
        key = "closed by the server"
    except asyncio.TimeoutError:
        key = "no answer in 20 s"
    seconds.append(time.perf_counter() - t0)
    answer.cancel()
    writer.close()
    outcomes[key] = outcomes.get(key, 0) + 1


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------


async def load_rounds(port: int, args: argparse.Namespace, end: float) -> dict[str, Any]:
    """``--rounds`` normal loads one after the other (each in its own process), with the
    median of their p99s: one 1,000-request load lasts about a second, so a single hiccup of this
    shared machine would otherwise decide the figure."""
    rounds = []
    for _ in range(args.rounds):
        rounds.append(await asyncio.get_running_loop().run_in_executor(
            None, normal_load_in_process, port, args.requests, args.concurrency, max(1.0, end - time.monotonic())))
    statuses: dict[str, int] = {}
    for r in rounds:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"rounds": rounds, "statuses": statuses, "errors": sum(r["errors"] for r in rounds),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in rounds),
            "p50_ms_median": statistics.median(r["p50_ms"] for r in rounds)}


async def abuse_phase(port: int, pid: int, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    stop = asyncio.Event()
    stats = {"idle_connects": 0, "idle_closed_by_server": 0, "idle_connect_errors": 0}
    slow_out: dict[str, int] = {}
    big_out: dict[str, int] = {}
    big_s: list[float] = []
    rss: list[float] = []

    async def sample_rss() -> None:
        while not stop.is_set():
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.2)

    end = min(deadline, time.monotonic() + args.abuse_seconds)
    tasks = [asyncio.ensure_future(idle_flood(port, args.idle, args.idle_max_connects, args.idle_reconnect_s, stop, stats)),
             asyncio.ensure_future(sample_rss()),
             *(asyncio.ensure_future(slow_body(port, stop, slow_out)) for _ in range(args.slow))]
    await asyncio.sleep(min(5.0, args.abuse_seconds / 4))  # let the flood build up
    big = [asyncio.ensure_future(oversized(port, big_out, big_s)) for _ in range(args.oversized)]
    drops0 = listen_drops()
    load = await load_rounds(port, args, end)
    drops1 = listen_drops()
    await asyncio.gather(*big)
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    return {"normal": load, "idle": stats, "slow_body": slow_out, "oversized": big_out,
            "oversized_answer_s_max": round(max(big_s), 3) if big_s else None,
            "kernel_tcp_counters_during_load": {k: drops1[k] - drops0.get(k, 0) for k in drops1},
            "rss_peak_mb": round(max(rss), 1) if rss else None}


async def sigterm_phase(port: int, proc: subprocess.Popen, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    outcomes: dict[str, int] = {}
    clients = [asyncio.ensure_future(slow_body(port, stop, outcomes)) for _ in range(args.slow)]
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    while proc.poll() is None and time.monotonic() - t0 < args.drain_s + 30:
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    return {"exited": proc.poll() is not None, "exit_code": proc.poll(), "seconds_after_sigterm": round(took, 2),
            "drain_s": args.drain_s, "slow_clients": args.slow}


async def wait_up(port: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
            w.close()
            return
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.3)
    raise TimeoutError("server not up")


def start_server(model: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slimtune.cli.main", "serve", "--model", str(model), "--host", HOST, "--port",
           str(port), "--api-key", KEY, "--max-connections", str(args.max_connections), "--header-timeout-s",
           str(args.header_timeout_s), "--body-timeout-s", str(args.body_timeout_s), "--drain-s", str(args.drain_s),
           "--log-level", "warning", "--threads", "1"]

    def limit_files() -> None:  # the server's file table smaller than the flood
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.server_nofile, args.server_nofile))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, preexec_fn=limit_files)


async def main_async(args: argparse.Namespace, model: Path, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    port = free_port()
    proc = start_server(model, port, args, log)
    if args.abuser_nice:  # this process runs the abusers: on a small machine they would take the server's CPU
        os.setpriority(os.PRIO_PROCESS, 0, args.abuser_nice)
    try:
        await wait_up(port, proc)
        await normal_load(port, 50, 4, deadline)  # warm-up
        quiet = await load_rounds(port, args, time.monotonic() + 120.0 * args.rounds)
        rss_quiet = round(rss_mb(proc.pid), 1)
        abuse = await abuse_phase(port, proc.pid, args, deadline)
        after = await normal_load(port, 50, 4, deadline)  # still healthy after the abuse
        term = await sigterm_phase(port, proc, args)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    five = sum(v for k, v in {**quiet["statuses"], **abuse["normal"]["statuses"]}.items() if k.startswith("5"))
    return {"settings": vars(args), "quiet": quiet, "rss_quiet_mb": rss_quiet, "abuse": abuse, "after_abuse": after,
            "sigterm": term, "normal_5xx": five,
            "p99_ratio": round(abuse["normal"]["p99_ms_median"] / max(quiet["p99_ms_median"], 1e-9), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="classifier folder to serve (default: a tiny random BERT built here)")
    p.add_argument("--requests", type=int, default=1000, help="normal requests per load run")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="normal loads quiet, and again under abuse (median p99)")
    p.add_argument("--idle", type=int, default=6000, help="idle flood connections held at once")
    p.add_argument("--idle-max-connects", type=int, default=20000, help="idle flood connects in all (with reconnects)")
    p.add_argument("--idle-reconnect-s", type=float, default=5.0, help="an idle client reconnects this long after a close")
    p.add_argument("--slow", type=int, default=50, help="slow-body clients (abuse and SIGTERM phases)")
    p.add_argument("--oversized", type=int, default=400, help="unauthenticated 1 MB bodies")
    p.add_argument("--abuse-seconds", type=float, default=30.0)
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--header-timeout-s", type=float, default=10.0)
    p.add_argument("--body-timeout-s", type=float, default=5.0)
    p.add_argument("--drain-s", type=float, default=3.0, help="under --body-timeout-s, so the drain is what ends the SIGTERM phase")
    p.add_argument("--server-nofile", type=int, default=4096, help="the server's open-file limit")
    p.add_argument("--abuser-nice", type=int, default=0,
                   help="nice value of the abusing clients (this process); the server and normal clients keep 0. "
                        "On a 2-core machine the abusers' own CPU otherwise starves the server they attack")
    p.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock bound of the whole run")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle + args.slow + args.oversized + args.concurrency + 64
    if need > hard:
        p.error(f"--idle {args.idle} (+ the other clients) needs {need} open files; this machine allows {hard} "
                f"(ulimit -Hn): lower --idle")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    with tempfile.TemporaryDirectory(prefix="slimtune-abuse-") as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp) / "model")
        log = Path(tmp) / "server.log"
        result = asyncio.run(main_async(args, model, log))
        result["server_log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    result["client_nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    ok = (result["normal_5xx"] == 0 and result["p99_ratio"] <= 3 and result["sigterm"]["exited"]
          and result["sigterm"]["seconds_after_sigterm"] <= args.drain_s + 3)
    print(f"\n{'OK' if ok else 'FAILED'}: 5xx {result['normal_5xx']}, p99 x{result['p99_ratio']} of quiet, "
          f"exit {result['sigterm']['seconds_after_sigterm']} s after SIGTERM (drain {args.drain_s} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
