"""The router's Prometheus metrics (prometheus-client), served at GET /metrics.

Event metrics (requests by outcome, TTFT, generation speed, prompt tokens) are observed
as they happen; the cluster's shape (workers alive, slots, queue depth) is read from the
router at scrape time by a custom collector, so a departed worker's series disappear
instead of going stale. Each router has its own registry (no global state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pichat.protocol import Usage

__all__ = ["RouterMetrics", "CONTENT_TYPE"]

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _ClusterCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self._snapshot()
        workers = snap["workers"]
        yield GaugeMetricFamily("pichat_workers_alive", "Workers registered and heard from.",
                                value=len(workers))
        yield GaugeMetricFamily("pichat_queue_depth", "Requests waiting for a slot.",
                                value=snap["queue"]["depth"])
        yield GaugeMetricFamily("pichat_requests_active", "Requests queued or running.",
                                value=snap["requests"]["active"])
        slots = GaugeMetricFamily("pichat_worker_slots", "Slots of a worker.",
                                  labels=["worker", "model"])
        busy = GaugeMetricFamily("pichat_worker_slots_busy", "Busy slots of a worker.",
                                 labels=["worker", "model"])
        warm = GaugeMetricFamily("pichat_worker_warm_sessions",
                                 "Conversations whose KV state a worker holds.",
                                 labels=["worker", "model"])
        for w in workers:
            labels = [w["name"], w["model"]]
            slots.add_metric(labels, w["slots"])
            busy.add_metric(labels, w["busy"])
            warm.add_metric(labels, w["warm_sessions"])
        yield slots
        yield busy
        yield warm


class RouterMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pichat_requests", "Requests by outcome (completed, or the "
                                "error code).", ["outcome"], registry=r)
        self.ttft = Histogram("pichat_ttft_seconds", "Time to first token, from the router's "
                              "receipt of a request to its first chunk.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.tokens_per_s = Histogram("pichat_generation_tokens_per_second", "Generation speed "
                                      "of each answer.", buckets=_TPS_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pichat_prompt_tokens", "Prompt tokens of completed "
                                     "requests.", registry=r)
        self.cached_tokens = Counter("pichat_prompt_tokens_cached", "Prompt tokens served from "
                                     "a worker's KV cache (their share is the cache hit rate).",
                                     registry=r)
        self.completion_tokens = Counter("pichat_completion_tokens", "Generated tokens.",
                                         registry=r)
        self.placements = Counter("pichat_placements", "How requests were placed: affinity "
                                  "(warm worker), prefix (shared-prefix worker), load, spill, "
                                  "retry.", ["how"], registry=r)
        self.http_errors = Counter("pichat_http_errors", "HTTP requests refused or failed, by "
                                   "status (400 invalid, 401 key, 404, 413 too large, 429 "
                                   "busy, 503 no worker...).", ["status"], registry=r)
        self.loop_lag = Histogram("pichat_loop_lag_seconds", "How late the router's event "
                                  "loop ran a 100 ms timer (sampled every 100 ms).",
                                  buckets=_LAG_BUCKETS, registry=r)
        r.register(_ClusterCollector(snapshot))
        # process_resident_memory_bytes, cpu, open fds (where /proc tells them)
        self._process = ProcessCollector(registry=r)

    def completed(self, usage: Usage) -> None:
        self.requests.labels("completed").inc()
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        if usage.tokens_per_s:
            self.tokens_per_s.observe(usage.tokens_per_s)

    def resident_mb(self) -> float | None:
        """This process's resident memory, as /metrics reports it (None off Linux)."""
        for family in self._process.collect():
            if family.name == "process_resident_memory_bytes":
                return round(family.samples[0].value / 2**20, 1)
        return None

    def render(self) -> bytes:
        return generate_latest(self.registry)
