"""Whether this router's host holds the floating address (the one keepalived moves between
the router Pis, `--floating-address`), and since when: for `pichat status` and /metrics.

An address is this host's when a socket can be bound to it (without IP_FREEBIND the kernel
refuses an address no interface has). The router looks at every heartbeat: one system
call.

With routers sharing an etcd store (`--db etcd://`), the one holding the address writes
who holds it, and as of when, every heartbeat (`keep_record`; one small etcd write). The
router that takes the address reads that record first: when another router wrote it, this
is a failover, and the time from that router's last word until the taking here is the
time the address had no live holder (to within a heartbeat).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from pichat.errors import PichatError
from pichat.unpack import json_object

__all__ = ["FloatingAddress", "is_local", "keep_record", "RECORD_ROOT", "RECORD_MAX_BYTES"]

log = logging.getLogger(__name__)

RECORD_ROOT = "floating/"
"""Where in the shared store the holder's record is (one key per address)."""
RECORD_MAX_BYTES = 1024
"""A record longer than this (or not the JSON the routers write) is ignored."""
_NAME_MAX = 256


def is_local(address: str) -> bool:
    """Does an interface of this host hold `address` now?"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


class FloatingAddress:
    def __init__(self, address: str, held: Callable[[str], bool] = is_local,
                 clock: Callable[[], float] = time.time, name: str = "") -> None:
        self.address = address
        self._held = held
        self._clock = clock
        self.name = name
        """This router, as the record names it (host name and client endpoint)."""
        self.held = False
        self.since: float | None = None
        """Wall-clock time it was last taken (or given up)."""
        self.acquired = 0
        """Times this host took it (a failover to here, or the first hold)."""
        self.taken = False
        """Taken, and the shared record not yet read since (`took`)."""
        self.failovers = 0
        """Times it was taken from another router (as the shared record said)."""
        self.last_failover: dict[str, Any] | None = None
        """The last of those: from whom, when, and how long there was no holder."""

    def check(self) -> bool:
        """Look again; True if it changed hands here."""
        held = self._held(self.address)
        if held == self.held:
            return False
        self.held, self.since = held, self._clock()
        self.acquired += held
        self.taken = held
        log.info("%s the floating address %s", "holding" if held else "no longer holding",
                 self.address)
        return True

    def record(self) -> bytes:
        """What the holder writes to the shared store: who holds it, as of now."""
        return json.dumps({"router": self.name, "at": round(self._clock(), 3)}).encode()

    def took(self, previous: bytes | None) -> float | None:
        """The shared record as it was when this router took the address. If another
        router wrote it, that was a failover: counted, and its seconds returned (from
        that router's last record to the taking here; 0 if it wrote after, as when both
        held it for a moment). None if not a failover (no record, this router's own, or
        one that is not a record)."""
        self.taken = False
        prev = _parse(previous)
        if prev is None or prev[0] == self.name or self.since is None:
            return None
        seconds = max(0.0, self.since - prev[1])
        self.failovers += 1
        self.last_failover = {"from": prev[0], "at": round(self.since, 1),
                              "seconds": round(seconds, 2)}
        log.info("the floating address %s came here from %s: %.2f s with no holder",
                 self.address, prev[0], seconds)
        return seconds

    def as_status(self) -> dict[str, Any]:
        return {"address": self.address, "held": self.held,
                "since": round(self.since, 1) if self.since else None,
                "acquired": self.acquired, "failovers": self.failovers,
                "last_failover": self.last_failover}


def _parse(raw: bytes | None) -> tuple[str, float] | None:
    """(router, at) of a record, or None: read as any peer's message (bounded, checked)."""
    record = json_object(raw, RECORD_MAX_BYTES)
    if record is None:
        return None
    router, at = record.get("router"), record.get("at")
    if not isinstance(router, str) or not 0 < len(router) <= _NAME_MAX:
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return None
    return router, float(at)


class SharedStore(Protocol):
    async def get_item(self, root: str, name: str) -> bytes | None: ...

    async def put_item(self, root: str, name: str, value: bytes) -> None: ...


async def keep_record(floating: FloatingAddress, store: SharedStore, interval: float,
                      on_failover: Callable[[float], None]) -> None:
    """Every `interval`: once the address was taken here, read the record (a failover to
    here, `on_failover(seconds)`), then, while held, write this router's. The store
    unreachable: tried again next time (logged when that starts and ends)."""
    failing = False
    while True:
        try:
            if floating.taken:
                seconds = floating.took(await store.get_item(RECORD_ROOT, floating.address))
                if seconds is not None:
                    on_failover(seconds)
            if floating.held:
                await store.put_item(RECORD_ROOT, floating.address, floating.record())
            if failing:
                log.info("the floating address's record is written again")
                failing = False
        except PichatError as exc:
            if not failing:
                log.warning("cannot keep the floating address's record: %s", exc)
                failing = True
        await asyncio.sleep(interval)
