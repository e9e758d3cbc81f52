"""Whether this router's host holds the floating address (the one keepalived moves between
the router Pis, `--floating-address`), and since when: for `pichat status` and /metrics.

An address is this host's when a socket can be bound to it (without IP_FREEBIND the kernel
refuses an address no interface has). The router looks at every heartbeat: one system
call.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FloatingAddress", "is_local"]

log = logging.getLogger(__name__)


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
                 clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self._held = held
        self._clock = clock
        self.held = False
        self.since: float | None = None
        """Wall-clock time it was last taken (or given up)."""
        self.acquired = 0
        """Times this host took it (a failover to here, or the first hold)."""

    def check(self) -> bool:
        """Look again; True if it changed hands here."""
        held = self._held(self.address)
        if held == self.held:
            return False
        self.held, self.since = held, self._clock()
        self.acquired += held
        log.info("%s the floating address %s", "holding" if held else "no longer holding",
                 self.address)
        return True

    def as_status(self) -> dict[str, Any]:
        return {"address": self.address, "held": self.held,
                "since": round(self.since, 1) if self.since else None,
                "acquired": self.acquired}
