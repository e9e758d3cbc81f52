"""Join tokens: how a new Pi is let in without copying anyone's secret to it.

`pichat invite` on the router's host makes a token: the router's addresses and public
key, an invitation id and a one-time secret, with an expiry and a number of uses. The
router keeps only the secret's hash (`invites/ID.json` in its keys directory, readable by
its owner only). A joining Pi makes its own key pair, reaches the router over CURVE with
the router's public key from the token, and proves the secret; the router then admits
the Pi's public key under its name. So a token carries nothing secret but its own
one-time secret, and a stolen, used or expired token lets nobody in.

Pure file operations (no sockets): `invite` writes an invitation, `parse` reads a token,
`join` checks one and the joiner's name and key, and only then uses it and admits the key
(under a lock: two Pis racing for the last use cannot both get it; a right token with a
name that cannot be admitted uses nothing), `members` and `revoke` list and revoke admitted
keys; `stored_router` and `remember_router` read and write a joined Pi's router.json.

A name is bound to its key for good. `revoke` moves the key's file to `revoked/ROLEs/`,
where it stays: a revoked name is never admitted again, nor a revoked key under any name
(`join` refuses both, and the router's allow-lists skip an entry that a tombstone names,
however it got there). So a conversation's owner, a key's name, can only ever be that key;
re-admitting a revoked name takes deleting its tombstone by hand.

A keys directory whose group has the setgid bit (`make install-systemd` makes the
router's so: `sudo pichat invite` runs as root, the router as a systemd dynamic user of
group pichat) is shared with its group: invitations, the lock and admitted keys are
written group-readable and -writable there, owner-only everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zmq.utils import z85

from pichat.errors import PichatError

__all__ = ["Invitation", "InviteRefused", "invite", "parse", "redeem", "join", "admit",
           "members", "revoke", "revoked", "stored_router", "remember_router", "PREFIX",
           "ROLES", "ROUTER_FILE", "REVOKED", "SHARED", "shared_files", "put_shared"]

PREFIX = "pichat1."
ROLES = ("worker", "client")
Role = Literal["worker", "client"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ID = re.compile(r"^[0-9a-f]{16}$")
MAX_TOKEN_CHARS = 4096
FORGET_AFTER = 86400.0
"""Seconds an expired invitation is kept (a late joiner is told "expired", not "unknown")
before a new invitation forgets it."""
REVOKED = "revoked"
"""In the router's keys directory: `revoked/workers/NAME.key`, `revoked/clients/NAME.key`,
the tombstones of revoked keys."""
ROUTER_FILE = "router.json"
"""In a joined Pi's keys directory: the router's endpoints by role ("workers", "clients"),
what --router defaults to, and the name the Pi joined under ("name", a worker's default
--name)."""


class InviteRefused(PichatError):
    """A token that is unknown, used up, expired or forged: the reason is the message."""


@dataclass(frozen=True, slots=True)
class Invitation:
    role: Role
    addresses: tuple[str, ...]
    """Where the router's join endpoint listens (tcp://HOST:PORT), most likely first."""
    router_key: str
    """The router's CURVE public key (Z85, 40 characters)."""
    id: str
    secret: str

    def token(self) -> str:
        body = {"r": self.role, "a": list(self.addresses), "k": self.router_key,
                "i": self.id, "s": self.secret}
        raw = json.dumps(body, separators=(",", ":")).encode()
        return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def invite(keys_dir: Path, *, role: Role, addresses: tuple[str, ...], router_key: str,
           ttl: float = 3600.0, uses: int = 1, now: float | None = None) -> Invitation:
    """A new invitation, kept (hashed) in `keys_dir/invites`."""
    if role not in ROLES:
        raise PichatError(f"an invitation is for a worker or a client, not {role!r}")
    if ttl <= 0 or uses < 1:
        raise PichatError("an invitation needs a positive --ttl and at least one use")
    now = time.time() if now is None else now
    found = Invitation(role, tuple(addresses), router_key, secrets.token_hex(8),
                       secrets.token_urlsafe(24))
    folder = _folder(keys_dir)
    record = {"role": role, "hash": _hash(found.secret), "expires": now + ttl, "uses": uses,
              "created": now}
    with _locked(folder):
        _prune(folder, now - FORGET_AFTER)
        _write(folder / f"{found.id}.json", record)
    return found


def _prune(folder: Path, before: float) -> None:
    """Forget invitations expired before `before` (a deployment that invites at every
    start leaves one behind each time)."""
    for path in folder.glob("*.json"):
        try:
            if json.loads(path.read_text()).get("expires", 0) < before:
                path.unlink()
        except (OSError, ValueError, AttributeError):
            continue


def parse(token: str) -> Invitation:
    """A token's contents; InviteRefused saying what is wrong with a malformed one."""
    token = token.strip()
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise InviteRefused(f"not a pichat join token (it starts with {PREFIX!r}; copy the "
                            "whole line `pichat invite` printed)")
    body = token[len(PREFIX):]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        role, addresses, key = data["r"], tuple(data["a"]), data["k"]
        ident, secret = data["i"], data["s"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InviteRefused("the join token is damaged (copy the whole line again)") from None
    if role not in ROLES or not all(isinstance(a, str) and a.startswith("tcp://")
                                    for a in addresses) or not addresses:
        raise InviteRefused("the join token names no router to join")
    if not (isinstance(key, str) and len(key) == 40 and isinstance(secret, str)
            and isinstance(ident, str) and _ID.match(ident)):
        raise InviteRefused("the join token is damaged (copy the whole line again)")
    return Invitation(role, addresses, key, ident, secret)


def redeem(keys_dir: Path, ident: str, secret: str, now: float | None = None) -> Role:
    """Use one of invitation `ident`'s uses if `secret` is its secret and it has not
    expired; its role. InviteRefused otherwise (a wrong secret uses nothing)."""
    return _redeem(keys_dir, ident, secret, now, lambda role: None)


def join(keys_dir: Path, ident: str, secret: str, name: str, public_key: str,
         now: float | None = None, check: Callable[[Role], None] | None = None
         ) -> tuple[Role, Path]:
    """Admit `public_key` (Z85) as `name` with one use of invitation `ident`: its role
    and the allow-list entry written. Every check, of the token, of the name and key, and
    `check(role)` (raising InviteRefused), comes before the use is taken: a refusal uses
    nothing."""
    _check(name, public_key)
    written: list[Path] = []

    def then(role: Role) -> None:
        if check is not None:
            check(role)
        written.append(admit(keys_dir, role, name, public_key))

    role = _redeem(keys_dir, ident, secret, now, then)
    return role, written[0]


def _redeem(keys_dir: Path, ident: str, secret: str, now: float | None,
            then: Callable[[Role], None]) -> Role:
    """The checks of `redeem`; `then(role)` runs, under the lock, before the use is taken
    (raising, it takes nothing)."""
    now = time.time() if now is None else now
    if not _ID.match(ident or ""):
        raise InviteRefused("unknown invitation")
    folder = _folder(keys_dir)
    path = folder / f"{ident}.json"
    with _locked(folder):
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise InviteRefused("unknown or already used invitation") from None
        except (OSError, ValueError):
            raise InviteRefused("the invitation's record is unreadable") from None
        if not isinstance(record, dict) or record.get("role") not in ROLES:
            raise InviteRefused("the invitation's record is unreadable")
        if not hmac.compare_digest(str(record.get("hash", "")), _hash(secret)):
            raise InviteRefused("wrong secret for this invitation (a forged token?)")
        if now > record.get("expires", 0):
            path.unlink(missing_ok=True)
            raise InviteRefused("the invitation has expired: make a new one with "
                                "`pichat invite`")
        then(record["role"])
        record["uses"] = int(record.get("uses", 1)) - 1
        if record["uses"] <= 0:
            path.unlink()
        else:
            _write(path, record)
        return record["role"]


def admit(keys_dir: Path, role: Role, name: str, public_key: str) -> Path:
    """Let the key `public_key` (Z85) in as `role` `name` (the router's allow-list).
    Refuses a name held by another key, a revoked name, and a revoked key."""
    _check(name, public_key)
    if (keys_dir / REVOKED / f"{role}s" / f"{name}.key").exists():
        raise InviteRefused(f"the name {name!r} was revoked and is not given again: join "
                            "with another --name")
    if public_key.encode() in revoked(keys_dir)[1]:
        raise InviteRefused("this key was revoked: make a new one (delete this Pi's "
                            "keys and join again)")
    path = keys_dir / f"{role}s" / f"{name}.key"
    if path.exists() and public_key not in path.read_text():
        raise InviteRefused(f"the name {name!r} is taken by another key: join with --name")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, f"# {role} {name}, admitted by pichat join\n"
                      f"metadata\ncurve\n    public-key = \"{public_key}\"\n")
    return path


def _check(name: str, public_key: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InviteRefused(f"{str(name)[:64]!r} is not a usable name (letters, digits, "
                            "_ . -, at most 64, starting with a letter or digit)")
    if not isinstance(public_key, str) or len(public_key) != 40:
        raise InviteRefused("the joining key is not a CURVE public key")
    try:
        z85.decode(public_key.encode("ascii"))
    except Exception:  # z85 raises ValueError, KeyError, struct.error...
        raise InviteRefused("the joining key is not a CURVE public key") from None


def revoked(keys_dir: Path) -> tuple[dict[str, set[str]], set[bytes]]:
    """The tombstones: the revoked names by role ("worker", "client"), and every revoked
    public key (Z85). A tombstone that cannot be read still revokes its name."""
    names: dict[str, set[str]] = {role: set() for role in ROLES}
    keys: set[bytes] = set()
    for role in ROLES:
        try:
            found = sorted((keys_dir / REVOKED / f"{role}s").glob("*.key"))
        except OSError:
            continue
        for path in found:
            names[role].add(path.stem)
            try:
                keys.add(_public(path.read_text()))
            except (OSError, ValueError):
                continue
    return names, keys


def _public(text: str) -> bytes:
    found = re.search(r'public-key\s*=\s*"([^"]{40})"', text)
    if found is None:
        raise ValueError("no public key")
    return found.group(1).encode()


def members(keys_dir: Path) -> list[tuple[Role, str]]:
    """(role, name) of every admitted key."""
    return [(role, p.stem) for role in ROLES  # type: ignore[misc]
            for p in sorted((keys_dir / f"{role}s").glob("*.key"))]


def revoke(keys_dir: Path, name: str) -> list[Role]:
    """Revoke `name`'s admitted keys (of either role): each file moves to its tombstone in
    `revoked/`, so neither the name nor the key is admitted again. The roles it had."""
    gone: list[Role] = []
    for role in ROLES:
        path = keys_dir / f"{role}s" / f"{name}.key"
        if _NAME.match(name) and path.is_file():
            grave = keys_dir / REVOKED / f"{role}s"
            grave.mkdir(parents=True, exist_ok=True)
            os.replace(path, grave / path.name)
            gone.append(role)  # type: ignore[arg-type]
    if not gone:
        raise PichatError(f"no admitted key is named {name[:64]!r} (see `pichat keys list`)")
    return gone


SHARED = re.compile(r"^(?:(?:revoked/)?(?:workers|clients)/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
                    r"\.key|invites/[0-9a-f]{16}\.json)$")
"""The files of a keys directory that routers sharing it keep alike (relative paths):
admitted keys, tombstones, invitations. Not the key pairs, the API keys or router.json."""


def shared_files(keys_dir: Path) -> dict[str, tuple[int, int]]:
    """The `SHARED` files here, each with its (mtime ns, size)."""
    found: dict[str, tuple[int, int]] = {}
    for folder in ("workers", "clients", f"{REVOKED}/workers", f"{REVOKED}/clients",
                   "invites"):
        try:
            with os.scandir(keys_dir / folder) as it:
                for entry in it:
                    rel = f"{folder}/{entry.name}"
                    if SHARED.match(rel) and entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        found[rel] = (st.st_mtime_ns, st.st_size)
        except OSError:
            continue
    return found


def put_shared(keys_dir: Path, rel: str, text: str | None) -> None:
    """Write (None: remove) the `SHARED` file `rel`, as another router has it. An
    invitation is written under the invitations' lock (a join here may be using it)."""
    if not SHARED.match(rel):
        raise ValueError(f"not a shared file: {rel[:80]!r}")
    path = keys_dir / rel
    invitation = rel.startswith("invites/")
    if not invitation:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(_folder(keys_dir)) if invitation else nullcontext():
        if text is None:
            path.unlink(missing_ok=True)
        else:
            _write_text(path, text)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def stored_router(keys_dir: Path, role: str) -> str | None:
    """What a `pichat join` kept in `keys_dir` for `role` (the router's "workers" or
    "clients" endpoint, or the "name" joined under); None if it has not joined (or kept
    no such thing). PichatError if the file is damaged."""
    path = keys_dir / ROUTER_FILE
    try:
        found = json.loads(path.read_text()).get(role)
        return None if found is None else str(found)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise PichatError(f"{path} is unreadable ({exc}): run `pichat join` again") from None


def remember_router(keys_dir: Path, endpoints: dict[str, str]) -> None:
    """Keep the router's endpoints (merged into what is kept) for the next start."""
    path = keys_dir / ROUTER_FILE
    try:
        kept = json.loads(path.read_text())
        kept = kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):
        kept = {}
    _write_text(path, json.dumps({**kept, **endpoints}) + "\n")


def _folder(keys_dir: Path) -> Path:
    folder = keys_dir / "invites"
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if _shared(keys_dir):
            os.chmod(folder, 0o2770)
    return folder


def _shared(directory: Path) -> bool:
    """Is `directory` shared with its group (setgid, as make install-systemd makes it)?"""
    try:
        return bool(os.stat(directory).st_mode & 0o2000)
    except OSError:
        return False


def _mode(directory: Path) -> int:
    return 0o660 if _shared(directory) else 0o600


def _write(path: Path, record: dict) -> None:
    _write_text(path, json.dumps(record))


def _write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all, readable by its owner (and a shared group)."""
    mode = _mode(path.parent)
    # A fresh name (O_EXCL): nothing planted at a guessable NAME.tmp is followed.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)  # not narrowed by a umask
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    # O_NOFOLLOW: a symlink planted as .lock would make a later `sudo pichat invite`
    # create or chmod whatever it points at.
    fd = os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _mode(folder))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PichatError(f"{folder / '.lock'} is not a plain file: remove it")
        if st.st_uid == os.geteuid():
            os.fchmod(fd, _mode(folder))  # not narrowed by a umask
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
