"""Server metrics for ``slimtune serve``: Prometheus text exposition, written by hand (no extra dependency).

Top-level imports are stdlib only.
"""

import threading
from collections import Counter

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
        self.ttft = _Histogram(LATENCY_BUCKETS)  # generation: arrival -> first token chosen
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.forward_s.observe(seconds)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        """A sequence got its first token ``seconds`` after it was queued (its prompt prefilled)."""
        with self._lock:
            self.ttft.observe(seconds)
            self.prompt_tokens += prompt_tokens

    def generated(self, tokens: int) -> None:
        """A sequence ended after generating ``tokens`` tokens."""
        with self._lock:
            self.completion_tokens += tokens

    def render(self, queue_depth: int, live_sequences: int | None = None) -> str:
        """Prometheus text; ``live_sequences`` (causal LMs) adds the generation metrics."""
        with self._lock:
            out = ["# HELP slimtune_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE slimtune_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'slimtune_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP slimtune_request_duration_seconds Time from request start to response start.",
                    "# TYPE slimtune_request_duration_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("slimtune_request_duration_seconds", f'endpoint="{ep}"')
            out += ["# HELP slimtune_batch_size Rows per forward pass (texts; causal LMs: sequences per decode step).",
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
            if live_sequences is not None:
                out += ["# HELP slimtune_live_sequences Sequences being generated now (continuous batching).",
                        "# TYPE slimtune_live_sequences gauge", f"slimtune_live_sequences {live_sequences}",
                        "# HELP slimtune_prompt_tokens_total Prompt tokens prefilled.",
                        "# TYPE slimtune_prompt_tokens_total counter", f"slimtune_prompt_tokens_total {self.prompt_tokens}",
                        "# HELP slimtune_completion_tokens_total Tokens generated.",
                        "# TYPE slimtune_completion_tokens_total counter",
                        f"slimtune_completion_tokens_total {self.completion_tokens}",
                        "# HELP slimtune_time_to_first_token_seconds From a sequence's arrival to its first token.",
                        "# TYPE slimtune_time_to_first_token_seconds histogram",
                        *self.ttft.lines("slimtune_time_to_first_token_seconds")]
        return "\n".join(out) + "\n"


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics"]
