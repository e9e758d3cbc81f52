"""Which router may hold the floating address: the one holding an etcd key under a lease.

keepalived alone elects by VRRP adverts: two routers that cannot hear each other (their
link cut, both still serving) both take the address. With `--floating-address` and `--db
etcd://`, each router also campaigns for `floating/ADDRESS/holder` in etcd: the key is
written, bound to the router's lease, only where nobody holds it, and the lease lives
while the router renews it. `GET /health/floating` answers 200 only on the router holding
it (503 elsewhere), and keepalived's check on each router Pi asks that: a router that
cannot reach the etcd majority loses the key within the lease's time, the one that can
takes it, and only one router's check passes, split or not.

The holder stops saying so locally before etcd can let the lease go (`margin` before the
lease's end counted from before its last renewal was sent), so two routers never both
pass their check, clocks aside. A router stopping gives its lease back (the other takes
the key at once); a router dying is replaced once its lease runs out (`ttl`, 2 s: etcd's
least with a 1 s election timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pichat.errors import PichatError

__all__ = ["Election", "ROOT"]

log = logging.getLogger(__name__)

ROOT = "floating/"


class Election:
    def __init__(self, store: Any, address: str, name: str, *, ttl: int = 2,
                 interval: float = 0.25, margin: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.key = f"{address}/holder"
        self.name = name
        self.ttl = ttl
        self.interval = interval
        self.margin = margin
        self.clock = clock
        self.lease: int | None = None
        self._granted = ttl
        self._claimed = False
        self._valid_until = 0.0
        self.won = 0
        """Times this router took the key."""

    @property
    def holds(self) -> bool:
        """Is this router the one that may hold the floating address, now?"""
        return self._claimed and self.clock() < self._valid_until

    async def round(self) -> None:
        """Renew the lease (a new one if it ran out) and claim the key under it."""
        sent = self.clock()
        if self.lease is not None:
            left = await self.store.keepalive(self.lease)
            if left <= 0:
                self._lost("its lease ran out")
                self.lease = None
        if self.lease is None:
            self.lease = await self.store.grant(self.ttl)
            self._granted = self.ttl
            sent = self.clock()
        claimed = await self.store.claim(ROOT, self.key, self.name.encode(), self.lease)
        if claimed and not self._claimed:
            self.won += 1
            log.info("this router holds the floating address's key (it may take the "
                     "address)")
        elif not claimed and self._claimed:
            self._lost("another router holds it")
        self._claimed = claimed
        self._valid_until = sent + self._granted - self.margin

    def _lost(self, why: str) -> None:
        if self._claimed:
            log.warning("this router no longer holds the floating address's key: %s", why)
        self._claimed = False

    async def run(self) -> None:
        """A round every `interval` until cancelled (then the lease is given back). The
        store unreachable: logged once; the hold lapses on its own."""
        failing = False
        try:
            while True:
                try:
                    await self.round()
                    if failing:
                        log.info("the floating address's election reaches etcd again")
                    failing = False
                except PichatError as exc:
                    if not failing:
                        log.warning("the floating address's election cannot reach etcd "
                                    "(this router gives the address up in %.1f s): %s",
                                    max(0.0, self._valid_until - self.clock()), exc)
                    failing = True
                await asyncio.sleep(self.interval)
        finally:
            await self.resign()

    async def resign(self) -> None:
        """Give the lease back (the other router takes the key at once)."""
        lease, self.lease, self._claimed = self.lease, None, False
        if lease is not None:
            with contextlib.suppress(PichatError):
                await asyncio.shield(self.store.revoke(lease))
