"""The cluster as `pichat status --json` (and /v1/cluster, and the chat page) shows it: a
view computed from the router's one registry of workers and requests (the scheduler's)
and its one set of counts (`Stats`), never kept by hand."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, Protocol

from pichat import __version__
from pichat.config import RouterConfig
from pichat.logs import Throttle
from pichat.protocol import Heartbeat, Ready
from pichat.router.observe.metrics import RouterMetrics
from pichat.router.observe.stats import Stats
from pichat.router.policy.prefix import PrefixIndex
from pichat.router.policy.scheduler import Scheduler
from pichat.security import Gatekeeper
from pichat.transport import Channel

__all__ = ["Observed", "snapshot"]


class Observed(Protocol):
    """What the snapshot reads of the router (it changes nothing)."""

    config: RouterConfig
    scheduler: Scheduler
    stats: Stats
    metrics: RouterMetrics
    prefixes: PrefixIndex
    throttle: Throttle
    gatekeeper: Gatekeeper | None
    clients_channel: Channel | None
    workers_channel: Channel | None
    clients_endpoint: str
    workers_endpoint: str
    http_endpoint: str
    http_site: Any
    registrations: Counter[str]
    started: float
    loop_lag: tuple[float, float]

    def now(self) -> float: ...

    def active(self) -> int: ...


def snapshot(r: Observed) -> dict[str, Any]:
    now = r.now()
    sched = r.scheduler
    workers = []
    for wid, view in sched.workers.items():
        meta = view.meta
        if meta is None:
            continue
        ready = meta.ready
        workers.append({
            "name": ready.worker,
            "id": wid.hex(),
            "model": ready.model,
            "backend": ready.backend,
            "version": ready.version,
            "ctx": ready.ctx,
            "slots": ready.slots,
            "busy": view.busy,
            "streaming": sum(sched.jobs[j].streamed for j in view.jobs if j in sched.jobs),
            "warm_sessions": meta.heartbeat.warm,
            "tokens_per_s": round(meta.heartbeat.tps, 1),
            "served": meta.served,
            "restarts": max(0, r.registrations[ready.worker] - 1),
            "draining": meta.heartbeat.draining,
            "last_seen_s": round(now - view.last_seen, 2),
            "up_s": round(time.time() - meta.joined, 1),
            "memory": _worker_memory(ready, meta.heartbeat),
        })
    cfg = r.config
    gate = r.gatekeeper
    channels = [c for c in (r.clients_channel, r.workers_channel) if c is not None]
    return {
        "router": {
            "version": __version__,
            "policy": cfg.policy,
            "clients": r.clients_endpoint,
            "http": r.http_endpoint,
            "workers": r.workers_endpoint,
            "up_s": round(time.time() - r.started, 1),
            "memory": {"rss_mb": r.metrics.resident_mb(),
                       "python_blocks": sys.getallocatedblocks()},
            "loop_lag_ms": {"now": round(r.loop_lag[0] * 1000, 1),
                            "max_1m": round(r.loop_lag[1] * 1000, 1)},
            **({"floating": {**r.floating.as_status(),
                             **({"elected": r.election.holds} if r.election else {})}}
               if r.floating is not None else {}),
        },
        "queue": {"depth": sched.queue_depth, "limit": cfg.scheduler.queue_limit},
        "security": {
            "curve": cfg.keys is not None,
            "api_keys": bool(cfg.api_keys),
            "refused": dict(gate.refused) if gate else {},
            "isolate_cache": cfg.isolate_cache,
            "log_lines_suppressed": r.throttle.suppressed + (gate.throttle.suppressed
                                                             if gate else 0),
            "frames_dropped": sum(c.dropped for c in channels),
            "http_connections_refused": r.http_site.refused if r.http_site else 0,
            "http_connections_evicted": r.http_site.evicted if r.http_site else 0,
        },
        "requests": {
            "active": r.active(),
            **r.stats.as_status(),
            "sessions_remembered": len(sched.affinity),
            "sessions_forgotten": sched.sessions_forgotten,
            "pushed_out": sched.pushed_out,
            "cancels_ignored": sched.cancels_ignored,
            "prefixes_remembered": len(r.prefixes),
            "prefixes_forgotten": r.prefixes.dropped,
        },
        "workers": sorted(workers, key=lambda w: w["name"]),
    }


def _worker_memory(ready: Ready, beat: Heartbeat) -> dict[str, Any]:
    """What the worker's KV cache holds, and the RAM it and the session store take."""
    mib = 2 ** 20
    return {
        "engine": ready.engine,
        "kv_type": ready.kv_type,
        "kv_tokens": ready.kv_cells,
        "kv_used_tokens": beat.kv_used,
        "kv_mb": round(ready.kv_cells * ready.kv_token_bytes / mib, 1),
        "kv_kb_per_token": round(ready.kv_token_bytes / 1024, 1),
        "store_mb": round(beat.store_bytes / mib, 1),
        "store_budget_mb": round(ready.cache_bytes / mib, 1),
        "disk_states": beat.disk_states,
        "disk_mb": round(beat.disk_bytes / mib, 1),
        "restored_from_disk": beat.disk_restored,
        "disk_states_refused": beat.disk_refused,
        "disk_states_refused_format": beat.disk_refused_format,
    }
