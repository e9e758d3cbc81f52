"""The router's Prometheus metrics (prometheus-client), served at GET /metrics.

The counts (requests by outcome, placements, tokens, HTTP errors, events) are the router's
`Stats`, read at scrape time, so /metrics and `pichat status` show the same numbers; the
timings (TTFT, generation speed, loop lag) are histograms observed as they happen; the
cluster's shape (workers alive, slots, queue depth) is read from the router's snapshot
at scrape time, so a departed worker's series disappear instead of going stale. Each
router has its own registry (no global state).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pichat.protocol import Usage
from pichat.router.observe.stats import Stats

__all__ = ["RouterMetrics", "CONTENT_TYPE", "watch_loop_lag"]

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_TPS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
_FAILOVER_BUCKETS = (0.5, 1, 1.5, 2, 3, 5, 10, 30, 60)
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
        floating = snap["router"].get("floating")
        if floating is not None:
            yield GaugeMetricFamily(
                "pichat_floating_address_held", "1 while this router's host holds the "
                "floating address (keepalived's).", value=int(floating["held"]))
            yield CounterMetricFamily(
                "pichat_floating_address_acquired", "Times this router's host took the "
                "floating address (its first hold, then each failover to it).",
                value=floating["acquired"])


class _CountsCollector(Collector):
    """The router's counts (pichat/router/observe/stats.py), read at scrape time: the same numbers
    `pichat status` shows."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily]:
        st = self._stats
        yield _labelled("pichat_requests", "Requests by outcome (completed, cancelled, or the "
                        "error code).", "outcome", st.outcomes)
        yield _labelled("pichat_placements", "How requests were placed: affinity (warm "
                        "worker), prefix (shared-prefix worker), load, spill, retry, failover.",
                        "how", st.placements)
        yield _labelled("pichat_http_errors", "HTTP requests refused or failed, by status (400 "
                        "invalid, 401 key, 404, 408 slow body, 413 too large, 429 busy, 503 no "
                        "worker...).", "status", st.http_errors)
        yield _labelled("pichat_rejected", "Client messages refused before they became "
                        "requests, by reason.", "reason", st.rejected)
        yield _labelled("pichat_events", "Other router events (workers lost, stale results, "
                        "refused warm claims...).", "event", st.events)
        yield CounterMetricFamily("pichat_prompt_tokens", "Prompt tokens of completed requests.",
                                  value=st.prompt_tokens)
        yield CounterMetricFamily("pichat_prompt_tokens_cached", "Prompt tokens served from a "
                                  "worker's KV cache (their share is the cache hit rate).",
                                  value=st.cached_tokens)
        yield CounterMetricFamily("pichat_completion_tokens", "Generated tokens.",
                                  value=st.completion_tokens)


def _labelled(name: str, documentation: str, label: str,
              counts: Counter) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, n in sorted(counts.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], n)
    return family


class RouterMetrics:
    """/metrics: the counts from `Stats`, the cluster's shape from the snapshot, and the
    timings (TTFT, speed, loop lag), which only Prometheus keeps (as histograms)."""

    def __init__(self, stats: Stats, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pichat_ttft_seconds", "Time to first token, from the router's "
                              "receipt of a request to its first chunk.", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.tokens_per_s = Histogram("pichat_generation_tokens_per_second", "Generation speed "
                                      "of each answer.", buckets=_TPS_BUCKETS, registry=r)
        self.loop_lag = Histogram("pichat_loop_lag_seconds", "How late the router's event "
                                  "loop ran a 100 ms timer (sampled every 100 ms).",
                                  buckets=_LAG_BUCKETS, registry=r)
        self.failover = Histogram("pichat_floating_failover_seconds", "Failovers of the "
                                  "floating address to this router (with --db etcd://): the "
                                  "time from the last holder's last record to the taking "
                                  "here, with no live holder.", buckets=_FAILOVER_BUCKETS,
                                  registry=r)
        r.register(_CountsCollector(stats))
        r.register(_ClusterCollector(snapshot))
        # process_resident_memory_bytes, cpu, open fds (where /proc tells them)
        self._process = ProcessCollector(registry=r)

    def completed(self, usage: Usage) -> None:
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


async def watch_loop_lag(report: Callable[[float, float], None], period: float = 0.1) -> None:
    """How late the event loop runs a timer, every `period`: `report(lag, worst of the last
    minute)`. What a burst of costly messages does to heartbeats and to every client."""
    loop = asyncio.get_running_loop()
    window: deque[tuple[float, float]] = deque()
    while True:
        planned = loop.time() + period
        await asyncio.sleep(period)
        now = loop.time()
        lag = max(0.0, now - planned)
        while window and now - window[0][0] >= 60.0:
            window.popleft()
        window.append((now, lag))
        report(lag, max(v for _, v in window))
