"""What one HTTP peer can hold open: connections are capped in all and per address, and
a connection that has not yet proved anything cannot crowd out one that has.

aiohttp closes a connection that has not completed a request within its keep-alive
timeout (since 3.13 that also covers a new connection that never sends its headers, or
dribbles them); the router sets that timeout (`--http-idle-timeout`). What aiohttp does
not bound is how many connections are open at once: 1,100 silent connections were all
held, and each costs a file descriptor that ZeroMQ needs too. `GuardedSite` is aiohttp's
TCP site with a gate in front of each connection:

- a connection is *untrusted* until a request on it passed authentication (any complete
  request, when the router has no API keys). Untrusted ones are few: `UNTRUSTED_PER_ADDRESS`
  from one address, a quarter of `max_connections` in all; past that, the oldest untrusted
  one is closed to make room. A flood of silent connections only churns its own pool,
  while a client that sends its request at once is served (and then trusted);
- past `max_connections` in all, or a quarter of that from one address, the oldest
  untrusted connection is closed for the new one; if every one is trusted, the new
  connection gets a 503 and is closed before any handler exists for it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from aiohttp import web

__all__ = ["GuardedSite"]

_BODY = json.dumps({"error": {"message": "too many connections; retry later",
                              "type": "service_unavailable", "param": None,
                              "code": "too_many_connections"}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
         % (len(_BODY), _BODY))


UNTRUSTED_PER_ADDRESS = 16
"""Connections from one address that have not passed authentication yet (a browser opens
six at most)."""


class GuardedSite(web.TCPSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, backlog: int = 128) -> None:
        super().__init__(runner, host, port, backlog=backlog)
        self.max_connections = max_connections
        self.max_per_address = max(1, max_connections // 4)
        self.max_untrusted = max(1, max_connections // 4)
        self.max_untrusted_per_address = min(UNTRUSTED_PER_ADDRESS, self.max_per_address)
        self.open: Counter[str] = Counter()
        self.refused = 0
        """Connections answered 503 (every one open was trusted)."""
        self.evicted = 0
        """Untrusted connections closed to make room for newer ones."""
        self._untrusted: dict[_Gate, None] = {}  # oldest first
        self._untrusted_from: Counter[str] = Counter()
        self._gates: dict[Any, _Gate] = {}  # by transport

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self, server), self._host, self._port, backlog=self._backlog)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    def admit(self, gate: _Gate, address: str) -> bool:
        if self._untrusted_from[address] >= self.max_untrusted_per_address:
            self._evict(address)
        if len(self._untrusted) >= self.max_untrusted:
            self._evict(None)
        if self.open[address] >= self.max_per_address and not self._evict(address):
            self.refused += 1
            return False
        if sum(self.open.values()) >= self.max_connections and not self._evict(None):
            self.refused += 1
            return False
        self.open[address] += 1
        self._untrusted[gate] = None
        self._untrusted_from[address] += 1
        self._gates[gate.transport] = gate
        return True

    def trust(self, transport: Any) -> None:
        """A request on this connection passed authentication: it is kept like any other."""
        gate = self._gates.get(transport)
        if gate is not None and gate in self._untrusted:
            self._forget_untrusted(gate)

    def release(self, gate: _Gate) -> None:
        address = gate.address
        self._gates.pop(gate.transport, None)
        if gate in self._untrusted:
            self._forget_untrusted(gate)
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]

    def _forget_untrusted(self, gate: _Gate) -> None:
        del self._untrusted[gate]
        self._untrusted_from[gate.address] -= 1
        if self._untrusted_from[gate.address] <= 0:
            del self._untrusted_from[gate.address]

    def _evict(self, address: str | None) -> bool:
        """Close the oldest untrusted connection (from `address`, or from anywhere); its
        room is free at once. False if there is none."""
        victim = next((g for g in self._untrusted if address is None or g.address == address),
                      None)
        if victim is None:
            return False
        self.evicted += 1
        victim.close()
        return True


class _Gate(asyncio.Protocol):
    """Admits the connection (then hands every event to aiohttp's handler) or refuses it."""

    __slots__ = ("_site", "_factory", "_inner", "address", "transport")

    def __init__(self, site: GuardedSite, factory: Any) -> None:
        self._site = site
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self.address = ""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.transport = transport
        if not self._site.admit(self, self.address):
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def close(self) -> None:
        """Closed to make room: its counts are freed now, aiohttp hears of it as a lost
        connection."""
        inner, self._inner = self._inner, None
        if inner is None:
            return
        self._site.release(self)
        self.transport.abort()
        inner.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._site.release(self)
            self._inner.connection_lost(exc)
            self._inner = None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
