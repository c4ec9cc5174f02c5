"""Server counters and their Prometheus text exposition (format 0.0.4), without a client library.

Written by the scheduler thread and the event loop; single attribute updates under the GIL are enough for
counters that only grow, and a lock guards the histograms' several fields.
"""
from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_depth = 0  # requests waiting for a slot
        self.batch_size = 0  # rows in the last decode step
        self.running = 0
        self.ttft = Histogram()
        self.latency = Histogram()

    def request_done(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def generation_done(self, prompt_tokens: int, completion_tokens: int, ttft: float | None, latency: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            self.latency.observe(latency)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP zhllm_requests_total HTTP requests by route and status code.",
                     "# TYPE zhllm_requests_total counter"]
            lines += [f'zhllm_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            for name, kind, value, help_text in [
                ("zhllm_prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens of finished generations."),
                ("zhllm_completion_tokens_total", "counter", self.completion_tokens, "Generated tokens."),
                ("zhllm_queue_depth", "gauge", self.queue_depth, "Requests waiting for a batch slot."),
                ("zhllm_running_requests", "gauge", self.running, "Requests in the decode batch."),
                ("zhllm_batch_size", "gauge", self.batch_size, "Rows in the latest decode step."),
            ]:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, help_text in [
                ("zhllm_time_to_first_token_seconds", self.ttft, "From submission to the first generated token."),
                ("zhllm_request_latency_seconds", self.latency, "From submission to the last generated token."),
            ]:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(lines) + "\n"
