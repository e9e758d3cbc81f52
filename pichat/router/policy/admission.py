"""Whether the router takes a request, and as what: the pure half of `Router.submit`.

A request is refused if it is too large for this router (characters of conversation, or
bytes once encoded for a worker) or one a worker would refuse to decode (the same checks,
pichat/protocol.py `check`); else it becomes the request the workers see: its session
scoped to its owner (pichat/router/policy/identity.py), the owner's tag, the cache isolation
setting. A request without a session id gets one: the session of the conversation it
continues, if the prefix index knows it and it is this owner's, else a new one; a
conversation that merely shares a prefix (a common system prompt) names the session that
holds it, whose worker the scheduler may prefer.

Pure: no I/O, no clock; tested as a table (tests/test_admission.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pichat.errors import ErrorCode, ProtocolError
from pichat.protocol import Request, SessionId, check, encode
from pichat.router.policy.identity import owner_tag, scoped_session
from pichat.router.policy.prefix import PrefixIndex

__all__ = ["Admitted", "Refused", "admit"]

_ENVELOPE = 256
"""Room a worker's message limit must leave beyond the encoded request."""


@dataclass(frozen=True, slots=True)
class Admitted:
    request: Request
    """As the workers will see it (without a lease: that is per worker)."""
    shared: SessionId | None = None
    """A session holding a prefix this request shares: prefer its worker."""
    continued: bool = False
    """Its session was recognised from its messages (a stateless client's next turn)."""
    chars: int = 0
    """Characters of conversation text (what the scheduler sizes it by)."""


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    """What the stats count it as (prompt_too_large, too_large)."""
    code: ErrorCode
    message: str


def admit(request: Request, owner: str, *, prefixes: PrefixIndex | None, isolate: bool,
          max_prompt_chars: int, max_message_bytes: int) -> Admitted | Refused:
    """`prefixes`: the index of conversations seen (None: no session is recognised, as
    under the round-robin policy)."""
    size = (sum(len(m.content) for m in request.messages) + len(request.prompt or "")
            + sum(map(len, request.embed)))
    if size > max_prompt_chars:
        return Refused("prompt_too_large", ErrorCode.BAD_REQUEST,
                       f"the conversation is {size} characters; this router accepts at most "
                       f"{max_prompt_chars}")
    tag = owner_tag(owner)
    session = scoped_session(owner, request.session) if request.session else None
    shared: SessionId | None = None
    continued = False
    if session is None and request.messages and prefixes is not None:
        match = prefixes.lookup(request.messages, request.tools)
        if match.session is not None and match.session.startswith(f"{tag}~"):
            session, continued = match.session, True
        else:  # another owner's conversation is not this one's: only a shared prefix
            session = scoped_session(owner, f"auto-{request.id}")
            shared = match.shared or match.session
    admitted = replace(request, session=session, owner=tag, isolate=isolate, lease=None)
    try:  # what a worker would refuse to decode, refused here (it would answer nothing)
        check(admitted)
    except ProtocolError as exc:
        return Refused("invalid", ErrorCode.BAD_REQUEST,
                       f"a worker would refuse this request: {exc}")
    if sum(map(len, encode(admitted))) > max_message_bytes - _ENVELOPE:
        return Refused("too_large", ErrorCode.BAD_REQUEST,
                       "the request is larger than a worker accepts "
                       f"(--max-message-bytes {max_message_bytes})")
    return Admitted(admitted, shared, continued, size)
