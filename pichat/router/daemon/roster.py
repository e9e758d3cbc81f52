"""The routers that share one etcd store, each as it published itself: so that a Pi that
joins through one router is told every router's endpoints (`pichat join` keeps them all,
and the joined worker registers with each, the joined client tries each).

Each router (with `--db etcd://` and keys) writes, at start and every few minutes, one key
under `routers/`: its worker and client endpoints as the LAN reaches them (a wildcard
bind given this host's LAN address). A JOIN answered through it lists its own endpoints
first (as bound: the joiner puts in the address it reached), then the others'. What etcd
holds is read as any peer's message: bounded, checked, at most `MAX_ROUTERS` listed, and
a record older than `STALE_S` (a router gone for good) left out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pichat.errors import PichatError
from pichat.transport import ENDPOINT, this_host
from pichat.unpack import json_object

__all__ = ["ROOT", "MAX_ROUTERS", "publish", "others", "keep_published", "reachable"]

log = logging.getLogger(__name__)

ROOT = "routers/"
MAX_ROUTERS = 8
"""Routers named in a JOIN reply at most (itself among them)."""
MAX_RECORD_BYTES = 1024
STALE_S = 7 * 86400.0
"""A record not refreshed for this long is a router gone for good."""
REFRESH_S = 600.0
_WILDCARDS = ("*", "0.0.0.0", "[::]", "::")


def reachable(bound: str) -> str:
    """A bound endpoint as other hosts reach it: a wildcard host becomes this host's LAN
    address (tcp://0.0.0.0:5556 -> tcp://192.168.1.10:5556)."""
    host, _, port = bound.removeprefix("tcp://").rpartition(":")
    return f"tcp://{this_host() if host in _WILDCARDS else host}:{port}"


def _record(workers: str, clients: str, at: float) -> bytes:
    return json.dumps({"workers": workers, "clients": clients, "at": round(at)}).encode()


def _parse(raw: bytes) -> tuple[str, str, float] | None:
    record = json_object(raw, MAX_RECORD_BYTES)
    if record is None:
        return None
    workers, clients, at = record.get("workers"), record.get("clients"), record.get("at")
    if not all(isinstance(e, str) and ENDPOINT.fullmatch(e) for e in (workers, clients)):
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return None
    return workers, clients, float(at)


def _name(workers: str) -> str:
    return hashlib.sha256(workers.encode()).hexdigest()[:24]


async def publish(store: Any, workers: str, clients: str, clock: Callable[[], float] = time.time
                  ) -> None:
    """Write this router's record (`workers`, `clients`: its endpoints as bound)."""
    workers, clients = reachable(workers), reachable(clients)
    await store.put_item(ROOT, _name(workers), _record(workers, clients, clock()))


async def others(store: Any, workers: str, clock: Callable[[], float] = time.time
                 ) -> list[tuple[str, str]]:
    """The other routers' (workers, clients) endpoints, freshest first, at most
    `MAX_ROUTERS` - 1 (this router's own, by its `workers` endpoint as bound, left out)."""
    me = reachable(workers)
    found, _ = await store.items(ROOT)
    now = clock()
    listed: list[tuple[float, str, str]] = []
    for _, raw, _ in found[:1000]:
        record = _parse(raw)
        if record is None or record[0] == me or now - record[2] > STALE_S:
            continue
        listed.append((record[2], record[0], record[1]))
    listed.sort(reverse=True)
    return [(w, c) for _, w, c in listed[:MAX_ROUTERS - 1]]


async def keep_published(store: Any, workers: str, clients: str,
                         interval: float = REFRESH_S) -> None:
    """`publish` every `interval` (the router published at start; logged once while the
    store cannot be reached)."""
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            await publish(store, workers, clients)
            failing = False
        except PichatError as exc:
            if not failing:
                log.warning("cannot tell the other routers this router's endpoints: %s", exc)
                failing = True
