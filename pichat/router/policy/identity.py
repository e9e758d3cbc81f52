"""Who a peer is, as far as the router can prove it, and what that lets it touch.

- **Owners.** Every request has an owner: the name of the CurveZMQ key it came with (its
  ZAP User-Id), the HTTP API key, or, where nothing is authenticated, the connection or
  the address. Fair scheduling counts per owner, and session ids are per owner: the
  session "s1" of one owner is not the session "s1" of another (`scoped_session`), so
  nobody can address another's conversation or its warm KV state. Workers receive only
  an owner's `tag` (a short hash), which they use to stop KV reuse across owners at
  message boundaries.
- **Leases.** When the router places a session on a worker it signs the pair (`lease`):
  an HMAC over the worker's identity and the session id, with a key derived from the
  router's secret key. A worker re-announcing its warm sessions (READY after a reconnect
  or a router restart) proves each with its lease; claims without a valid lease are
  ignored, so an admitted worker cannot pull other conversations to itself.
- **Worker names.** A worker name is held by the key that registered it while that
  registration lives; another key cannot take the name over (`NameBook`).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac

from pichat.protocol import SessionId

__all__ = ["owner_tag", "scoped_session", "Leases", "NameBook"]

_TAG_BYTES = 6


def owner_tag(owner: str) -> str:
    """A short, stable, non-reversible tag for an owner (12 hex characters)."""
    return hashlib.blake2b(owner.encode(), digest_size=_TAG_BYTES,
                           person=b"pichat-owner").hexdigest()


def scoped_session(owner: str, session: str) -> SessionId:
    """The router-wide id of `owner`'s session `session`."""
    return SessionId(f"{owner_tag(owner)}~{session}")


def session_owner(session: str) -> str | None:
    """The owner tag a router-wide session id was scoped with (None: not scoped)."""
    tag, sep, _ = session.partition("~")
    return tag if sep else None


class Leases:
    """Signs and checks (worker identity, session) pairs."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.blake2b(secret, digest_size=32, person=b"pichat-lease").digest()

    def sign(self, worker: str, session: str) -> str:
        mac = hmac.new(self._key, f"{worker}\0{session}".encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def valid(self, worker: str, session: str, lease: str) -> bool:
        return hmac.compare_digest(self.sign(worker, session), lease)


class NameBook:
    """Which key holds each worker name, for as long as some registration uses it."""

    def __init__(self) -> None:
        self._holders: dict[str, tuple[str, set[bytes]]] = {}

    def claim(self, name: str, key: str, registration: bytes) -> str | None:
        """`registration` (a worker's routing id) takes `name` for `key`. Returns the key
        that holds the name instead, if it is another."""
        holder = self._holders.get(name)
        if holder is not None and holder[0] != key:
            return holder[0]
        if holder is None:
            holder = self._holders[name] = (key, set())
        holder[1].add(registration)
        return None

    def release(self, name: str, registration: bytes) -> None:
        holder = self._holders.get(name)
        if holder is not None:
            holder[1].discard(registration)
            if not holder[1]:
                del self._holders[name]

    def __len__(self) -> int:
        return len(self._holders)
