"""The router's join endpoint (`--join-bind`): a new Pi redeems a join token here.

The socket is a CURVE server like the others, but its ZAP domain ("join") admits any key:
the handshake proves only that the joiner holds the secret of the key it shows, which is
the key to admit. The one message it takes is JOIN (the invitation and its secret, a
name); a right one makes the key an admitted worker or client under that name
(pichat/invites.py: the allow-lists the other sockets read) and is answered with the
router's endpoints. A token is used only by a join that succeeds: a name that is taken,
revoked or malformed, a revoked key, or a joiner that could not reach what it joins (the
router serves its role on loopback only), is refused before the token loses a use. Anything
else is answered with an ERROR and logged (aggregated).
Attempts are rate-limited (`MAX_PER_MINUTE` in all): a token's secret is 144 random bits,
so guessing is hopeless anyway, and a flood costs the router little.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pichat.config import RouterConfig
from pichat.errors import ErrorCode, PichatError, ProtocolError
from pichat.invites import ROLES, InviteRefused, join
from pichat.logs import Throttle, clip
from pichat.protocol import Error, Join, decode, encode
from pichat.router.daemon import roster
from pichat.router.daemon.keyring import KeyRing
from pichat.router.observe.stats import Stats
from pichat.router.policy.ratelimit import RateLimit
from pichat.security import is_loopback
from pichat.transport import port_of

__all__ = ["JoinDesk", "MAX_PER_MINUTE"]


def _loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False

log = logging.getLogger(__name__)

MAX_PER_MINUTE = 30
_SHARED_TRIES = 3


class JoinHub(Protocol):
    """What the join desk needs of the router, and all it may touch."""

    config: RouterConfig
    stats: Stats
    workers_endpoint: str
    clients_endpoint: str
    keyring: KeyRing | None

    def now(self) -> float: ...


class JoinDesk:
    def __init__(self, router: JoinHub) -> None:
        self.router = router
        self.limit = RateLimit(MAX_PER_MINUTE / 60.0, MAX_PER_MINUTE)
        self.throttle = Throttle(log, router.config.log_repeat_window)
        self.channel: Any = None
        self._tasks: set[asyncio.Future] = set()

    def _reachable(self, role: str, peer: str) -> None:
        """InviteRefused (the token kept) if a joiner from `peer` could not reach what it
        joins: its endpoint bound to loopback only, the joiner elsewhere. A worker would
        send READY into the void and `pichat status` say no workers."""
        r = self.router
        bound = r.workers_endpoint if role == "worker" else r.clients_endpoint
        option = "--workers-bind" if role == "worker" else "--clients-bind"
        if is_loopback(bound) and peer and not _loopback_address(peer):
            raise InviteRefused(
                f"this router serves {role}s on {bound} only, which {peer} cannot reach: "
                f"restart it with {option} tcp://0.0.0.0:{port_of(bound)} (the token is "
                "still good)")

    def on_message(self, frames: list[bytes], sender: str) -> None:
        r = self.router
        now = r.now()
        if len(frames) < 2:
            return
        envelope, body = frames[:1], frames[1:]
        reply = lambda message: self.channel.send([*envelope, *encode(message)])  # noqa: E731
        if not self.limit.allow("join", now):
            reply(Error("", ErrorCode.BUSY, "too many join attempts; retry in a minute"))
            return
        try:
            message = decode(body)
        except ProtocolError as exc:
            reply(Error("", ErrorCode.PROTOCOL, str(exc)))
            return
        if not isinstance(message, Join):
            reply(Error("", ErrorCode.BAD_REQUEST, "this endpoint only takes JOIN"))
            return
        key, _, peer = sender.removeprefix("key:").partition(" ")  # not in Z85
        if r.keyring is None:
            outcome = self._try(message, key, peer, now)
            reply(outcome if isinstance(outcome, Error) else self._joined(message, key, *outcome))
            return
        task = asyncio.ensure_future(self._shared_join(message, key, peer, now, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shared_join(self, message: Join, key: str, peer: str, now: float,
                           reply: Callable[[Any], None]) -> None:
        """A join where the keys directory is shared with other routers (pichat/router/
        daemon/keyring.py): the invitation as etcd has it, its use counted there before
        the join is answered. Two routers using its last use at once: one join is undone
        and tried again, and finds the invitation used."""
        ring = self.router.keyring
        assert ring is not None
        keys_dir = self.router.config.keys.directory  # type: ignore[union-attr]
        rel = f"invites/{message.invitation}.json"
        try:
            for _ in range(_SHARED_TRIES):
                async with ring.lock:
                    await ring.round()
                    had = {role: (keys_dir / f"{role}s" / f"{message.name}.key").exists()
                           for role in ROLES}
                    outcome = self._try(message, key, peer, now)
                    if isinstance(outcome, Error):
                        reply(outcome)
                        return
                    role, path = outcome
                    # Undone: the admission, unless the name was this key's already.
                    undo = (lambda: None) if had[role] else partial(path.unlink,
                                                                    missing_ok=True)
                    if await ring.settle(rel, undo):
                        listed = await self._other_routers()
                        reply(self._joined(message, key, role, path, listed))
                        return
            reply(Error("", ErrorCode.BUSY, "the invitation was being used through another "
                                            "router at the same moment: try again"))
        except (PichatError, OSError) as exc:
            log.warning("join of %s not done: the keys shared with the other routers cannot "
                        "be reached or written: %s", clip(message.name, 64), exc)
            reply(Error("", ErrorCode.BUSY, "the router cannot reach the keys it shares "
                                            "with the other routers (the token is still "
                                            "good): try again"))

    def _try(self, message: Join, key: str, peer: str, now: float
             ) -> tuple[str, Path] | Error:
        """Join here: the role and the allow-list entry written, or the refusal."""
        keys = self.router.config.keys
        assert keys is not None  # the endpoint exists only with keys
        try:
            return join(keys.directory, message.invitation, message.secret, message.name,
                        key, check=lambda role: self._reachable(role, peer))
        except OSError as exc:  # e.g. a keys directory the router may only read
            log.error("join of %s failed: cannot write the allow-list in %s: %s",
                      clip(message.name, 64), keys.directory, exc.strerror)
            return Error("", ErrorCode.INTERNAL, "the router cannot write its allow-list; "
                                                 "its keys directory must be writable to it")
        except InviteRefused as exc:
            self.router.stats.events["joins_refused"] += 1
            self.throttle.log(now, logging.WARNING, "join refused", "join refused (%s): %s",
                              clip(message.name, 64), exc, detail=clip(message.name, 64))
            return Error("", ErrorCode.BAD_REQUEST, str(exc))

    async def _other_routers(self) -> list[tuple[str, str]]:
        """The other routers sharing this one's store (pichat/router/daemon/roster.py);
        none if it cannot be read now (the join is done: the joiner knows this router)."""
        ring = self.router.keyring
        assert ring is not None
        try:
            return await roster.others(ring.etcd, self.router.workers_endpoint)
        except PichatError as exc:
            log.warning("a join is told of this router only: %s", exc)
            return []

    def _joined(self, message: Join, key: str, role: str, path: Path,
                listed: Sequence[tuple[str, str]] = ()) -> Join:
        r = self.router
        r.stats.events["joins"] += 1
        log.info("%s %s joined (key %s..., %s)", role, clip(message.name, 64), key[:8], path)
        # This router's as bound (tcp://0.0.0.0:5556: the joiner puts in the host it
        # reached us by), then the other routers' as they are reached.
        return Join(message.invitation, "-", message.name,
                    workers=",".join([r.workers_endpoint, *(w for w, _ in listed)]),
                    clients=",".join([r.clients_endpoint, *(c for _, c in listed)]))
