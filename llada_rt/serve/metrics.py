"""Metrics: the server's Prometheus series (one registry per server, so that several servers in one process, as in the
tests, count apart) and the sliding-window rates shown as gauges."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("completed", "cancelled", "rejected", "invalid", "error")
# seconds; a step of LLaDA-8B on a GPU is tens of milliseconds, a long CPU answer minutes
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
RATE_WINDOW_S = 10.0
# seconds of one engine step: ~1 ms (a small model's cached step on a GPU) to seconds (a long CPU canvas)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Counters and histograms updated by the app (outcomes of rejected/invalid requests) and by the scheduler's
    engine thread (everything else); prometheus_client is thread-safe."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llada_rt_requests", "HTTP generation requests by endpoint and outcome "
                                "(completed, cancelled by a client disconnect, rejected with 429/503, invalid 4xx, "
                                "error 5xx)", ["endpoint", "outcome"], registry=r)
        self.queue_depth = Gauge("llada_rt_queue_depth", "engine rows waiting for a slot", registry=r)
        self.rows_in_flight = Gauge("llada_rt_rows_in_flight", "engine rows being denoised", registry=r)
        self.prompt_tokens = Counter("llada_rt_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("llada_rt_completion_tokens", "completion tokens returned (usage)",
                                         registry=r)
        self.committed = Counter("llada_rt_committed_tokens", "answer positions committed by denoising steps",
                                 registry=r)
        self.forwards = Counter("llada_rt_forwards", "model forward passes run by the engine", registry=r)
        self.steps = Counter("llada_rt_engine_steps", "engine steps (each advances every row in flight)", registry=r)
        self.step_seconds = Histogram("llada_rt_engine_step_seconds", "wall time of one engine step (its forwards, "
                                      "confidence, remask and bookkeeping)", buckets=STEP_BUCKETS, registry=r)
        self.step_rows = Histogram("llada_rt_engine_step_rows", "rows advanced by one engine step",
                                   buckets=ROW_BUCKETS, registry=r)
        self.latency = Histogram("llada_rt_request_latency_seconds", "arrival to last byte of the answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llada_rt_time_to_first_token_seconds", "arrival to the first stable text sent (or to "
                              "the answer when its text is empty)", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("llada_rt_queue_wait_seconds", "arrival to the row's first step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self._window: collections.deque = collections.deque()   # (time, committed tokens, forwards) per step
        self._lock = threading.Lock()
        Gauge("llada_rt_committed_tokens_per_second", f"committed tokens per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(lambda: self._rate(1))
        Gauge("llada_rt_forwards_per_second", f"forward passes per second over the last {RATE_WINDOW_S:g} s",
              registry=r).set_function(lambda: self._rate(2))
        for endpoint in ("completions", "chat"):   # every series present from the start (rate() needs a zero)
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def step(self, committed: int, forwards: int, seconds: float, rows: int) -> None:
        now = time.perf_counter()
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.step_rows.observe(rows)
        self.committed.inc(committed)
        self.forwards.inc(forwards)
        with self._lock:
            self._window.append((now, committed, forwards))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._window and self._window[0][0] < now - RATE_WINDOW_S:
            self._window.popleft()

    def _rate(self, field: int) -> float:
        with self._lock:
            self._trim(time.perf_counter())
            return sum(w[field] for w in self._window) / RATE_WINDOW_S

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)
