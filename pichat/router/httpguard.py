"""What one HTTP peer can hold open: connections are capped in all and per address.

aiohttp closes a connection that has not completed a request within its keep-alive
timeout (since 3.13 that also covers a new connection that never sends its headers, or
dribbles them); the router sets that timeout (`--http-idle-timeout`). What aiohttp does
not bound is how many connections are open at once: 1,100 silent connections were all
held, and each costs a file descriptor that ZeroMQ needs too. `GuardedSite` is aiohttp's
TCP site with a gate in front of each connection: past `max_connections` in all, or a
quarter of that from one address, a new connection gets a 503 and is closed before any
handler exists for it.
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


class GuardedSite(web.TCPSite):
    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 max_connections: int, backlog: int = 128) -> None:
        super().__init__(runner, host, port, backlog=backlog)
        self.max_connections = max_connections
        self.max_per_address = max(1, max_connections // 4)
        self.open: Counter[str] = Counter()
        self.refused = 0

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

    def admit(self, address: str) -> bool:
        if sum(self.open.values()) >= self.max_connections or \
                self.open[address] >= self.max_per_address:
            self.refused += 1
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


class _Gate(asyncio.Protocol):
    """Admits the connection (then hands every event to aiohttp's handler) or refuses it."""

    __slots__ = ("_site", "_factory", "_inner", "_address")

    def __init__(self, site: GuardedSite, factory: Any) -> None:
        self._site = site
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if not self._site.admit(address):
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        self._address = address
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._site.release(self._address)
            self._inner.connection_lost(exc)
            self._inner = None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
