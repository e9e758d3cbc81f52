"""The router's join endpoint (`--join-bind`): a new Pi redeems a join token here.

The socket is a CURVE server like the others, but its ZAP domain ("join") admits any key:
the handshake proves only that the joiner holds the secret of the key it shows, which is
the key to admit. The one message it takes is JOIN (the invitation and its secret, a
name); a right one makes the key an admitted worker or client under that name
(pichat/invites.py: the allow-lists the other sockets read) and is answered with the
router's endpoints. A token is used only by a join that succeeds: a name that is taken,
revoked or malformed, or a revoked key, is refused before the token loses a use. Anything
else is answered with an ERROR and logged (aggregated).
Attempts are rate-limited (`MAX_PER_MINUTE` in all): a token's secret is 144 random bits,
so guessing is hopeless anyway, and a flood costs the router little.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pichat.errors import ErrorCode, ProtocolError
from pichat.invites import InviteRefused, join
from pichat.logs import Throttle, clip
from pichat.protocol import Error, Join, decode, encode
from pichat.router.ratelimit import RateLimit

if TYPE_CHECKING:
    from pichat.router.service import Router

__all__ = ["JoinDesk", "MAX_PER_MINUTE"]

log = logging.getLogger(__name__)

MAX_PER_MINUTE = 30


class JoinDesk:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.limit = RateLimit(MAX_PER_MINUTE / 60.0, MAX_PER_MINUTE)
        self.throttle = Throttle(log, router.config.log_repeat_window)
        self.channel: Any = None

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
        key = sender.removeprefix("key:")
        keys = r.config.keys
        assert keys is not None  # the endpoint exists only with keys
        try:
            role, path = join(keys.directory, message.invitation, message.secret,
                              message.name, key)
        except OSError as exc:  # e.g. a keys directory the router may only read
            log.error("join of %s failed: cannot write the allow-list in %s: %s",
                      clip(message.name, 64), keys.directory, exc.strerror)
            reply(Error("", ErrorCode.INTERNAL, "the router cannot write its allow-list; "
                                                "its keys directory must be writable to it"))
            return
        except InviteRefused as exc:
            r.stats.events["joins_refused"] += 1
            self.throttle.log(now, logging.WARNING, "join refused", "join refused (%s): %s",
                              clip(message.name, 64), exc, detail=clip(message.name, 64))
            reply(Error("", ErrorCode.BAD_REQUEST, str(exc)))
            return
        r.stats.events["joins"] += 1
        log.info("%s %s joined (key %s..., %s)", role, clip(message.name, 64), key[:8], path)
        # As bound (tcp://0.0.0.0:5556): the joiner puts in the host it reached us by.
        reply(Join(message.invitation, "-", message.name, workers=r.workers_endpoint,
                   clients=r.clients_endpoint))
