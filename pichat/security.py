"""CurveZMQ keys and ZAP authentication for every pichat link.

A keys directory (`--keys`, default ~/.config/pichat/keys when it exists) holds:

    router.key, router.key_secret     the router's key pair; router.key goes to every Pi
    worker.key, worker.key_secret     a worker key pair (each Pi may have its own: --key-name)
    client.key, client.key_secret     a client key pair
    workers/*.key                     the router admits workers with these public keys
    clients/*.key                     ... and clients with these
    revoked/{workers,clients}/*.key   tombstones (`pichat keys revoke`): never admitted again
    api-keys                          HTTP API keys, one per line (for --api-key-file)

`pichat keygen` writes it. The router's sockets are CURVE servers; a ZAP handler
(`Gatekeeper`) admits a peer only if its public key is in the socket's allow-list
directory, re-read when a file in it changes, and logs refusals (aggregated) with the
peer's address. An admitted peer's messages carry its key's name (the file name) as
their ZAP User-Id: the router's notion of who owns a request, and which keys may use a
worker name. Workers and clients are CURVE clients of the router's public key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.utils import z85

from pichat.errors import PichatError
from pichat.invites import REVOKED, ROLES, revoked
from pichat.logs import Throttle, clip
from pichat.transport import Channel

__all__ = [
    "DEFAULT_KEYS_DIR",
    "Keys",
    "resolve_keys",
    "keygen",
    "AllowList",
    "Gatekeeper",
    "is_loopback",
]

log = logging.getLogger(__name__)

DEFAULT_KEYS_DIR = Path("~/.config/pichat/keys")
OFF = ("off", "none", "no", "")


@dataclass(frozen=True, slots=True)
class Keys:
    directory: Path

    def pair(self, name: str) -> tuple[bytes, bytes]:
        path = self.directory / f"{name}.key_secret"
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            raise PichatError(f"cannot read the key pair {path}: {exc}. Create keys with "
                              f"`pichat keygen --keys {self.directory}`") from None
        if secret is None:
            raise PichatError(f"{path} holds no secret key")
        return public, secret

    def router_public(self) -> bytes:
        path = self.directory / "router.key"
        try:
            return zmq.auth.load_certificate(path)[0]
        except (OSError, ValueError) as exc:
            raise PichatError(f"cannot read the router's public key {path}: {exc}") from None

    def on_routers_host(self) -> bool:
        """Are these the router's own keys (its secret is here): this is its host, where
        the router is at the default loopback address and nothing need be looked for."""
        return (self.directory / "router.key_secret").exists()

    def allowed(self, role: str) -> Path:
        return self.directory / f"{role}s"

    def secure_server(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` (bound by the router) a CURVE server checked by ZAP `domain`."""
        public, secret = self.pair("router")
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def secure_client(self, sock: zmq.Socket, name: str) -> None:
        """Make `sock` (a worker's or client's) a CURVE client of the router."""
        public, secret = self.pair(name)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = self.router_public()


def resolve_keys(option: str | None) -> Keys | None:
    """The keys for `--keys`: 'off' disables them; unset means the default directory if
    it exists; a named directory must exist."""
    if option is not None and option.strip().lower() in OFF:
        return None
    if option is None:
        default = DEFAULT_KEYS_DIR.expanduser()
        return Keys(default) if (default / "router.key").is_file() else None
    path = Path(option).expanduser()
    if not (path / "router.key").is_file():
        raise PichatError(f"no pichat keys in {path} (router.key missing). Create them with "
                          f"`pichat keygen --keys {path}`")
    return Keys(path)


def keygen(directory: Path, *, workers: tuple[str, ...] = (), clients: tuple[str, ...] = (),
           api_key: bool = True) -> list[Path]:
    """Create what is missing in `directory`: the router's, a worker's and a client's key
    pairs (plus one per extra name), their allow-list entries, and an HTTP API key.
    Existing keys are kept. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    written: list[Path] = []
    for role, names in (("worker", ("worker", *workers)), ("client", ("client", *clients))):
        allow = directory / f"{role}s"
        allow.mkdir(exist_ok=True)
        for name in names:
            written += _pair(directory, name)
            entry = allow / f"{name}.key"
            if not entry.exists() and not (directory / REVOKED / f"{role}s" / entry.name).exists():
                shutil.copyfile(directory / f"{name}.key", entry)
                written.append(entry)
    written += _pair(directory, "router")
    api = directory / "api-keys"
    if api_key and not api.exists():
        api.write_text(f"# HTTP API keys (Authorization: Bearer KEY), one per line\n"
                       f"pichat-{secrets.token_urlsafe(24)}\n")
        os.chmod(api, 0o600)
        written.append(api)
    return written


def _pair(directory: Path, name: str) -> list[Path]:
    if (directory / f"{name}.key_secret").exists():
        return []
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


class AllowList:
    """The public keys admitted to one domain: the `*.key` files of a directory, each
    named after its holder (workers/pi2.key admits the key named "pi2").

    Read file by file: a file that does not parse (an empty file while scp copies it, a
    directory named x.key, an unreadable file) is skipped with a log line, not fatal; if
    the directory itself cannot be read, the last good set stays in force. Re-read when
    any entry's name, size or mtime changes: looked at when the directory changes (a
    file added or removed), and on a refusal at most every `_RESCAN_S` (a file written in
    place), so a flood of unknown keys costs at most a few scans a second."""

    MAX_FILES = 10_000

    def __init__(self, directory: Path, domain: str, keys_dir: Path | None = None) -> None:
        self.directory = directory
        self.domain = domain
        self.keys_dir = keys_dir
        """The keys directory whose tombstones (`revoked/`) this list honours."""
        self._keys: dict[bytes, str] = {}
        self._names: set[str] = set()
        self._gone: set[str] = set()
        self._stamp: tuple | None = None
        self._dir_stamp: tuple | None = None
        self._scanned = -1.0
        self._broken = False

    def lookup(self, z85_key: bytes, now: float) -> str | None:
        """The name of an admitted key (None: refused)."""
        dir_stamp = self._dirs()
        if dir_stamp != self._dir_stamp or (
                z85_key not in self._keys and now - self._scanned >= _RESCAN_S):
            self._dir_stamp = dir_stamp
            self._scanned = now
            self._refresh()
        return self._keys.get(z85_key)

    def __len__(self) -> int:
        return len(self._keys)

    def names(self) -> set[str]:
        """The admitted names (the set itself: read, do not change)."""
        return self._names

    def poll(self, now: float) -> set[str]:
        """Look at the directory now; the names that were admitted and no longer are
        since the last poll (a key revoked: `pichat keys revoke`, or its file removed)."""
        dir_stamp = self._dirs()
        if dir_stamp != self._dir_stamp:
            self._dir_stamp = dir_stamp
            self._scanned = now
            self._refresh()
        gone, self._gone = self._gone, set()
        return gone

    def _dirs(self) -> tuple:
        """When the allow-list's directory and the tombstones' last changed."""
        dirs = [self.directory]
        if self.keys_dir is not None:
            dirs += [self.keys_dir / REVOKED / f"{role}s" for role in ROLES]
        stamps = []
        for d in dirs:
            try:
                stamps.append(d.stat().st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _refresh(self) -> None:
        try:
            entries = []
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.name.endswith(".key") and len(entries) < self.MAX_FILES:
                        try:
                            st = entry.stat()
                            entries.append((entry.name, st.st_mtime_ns, st.st_size))
                        except OSError:
                            entries.append((entry.name, 0, -1))
        except OSError as exc:
            if not self._broken:
                log.error("%s: cannot read the allow-list %s (%s); keeping the last %d keys",
                          self.domain, self.directory, exc.strerror, len(self._keys))
            self._broken = True
            return
        self._broken = False
        graves, dead = (revoked(self.keys_dir) if self.keys_dir is not None
                        else ({}, set()))
        dead_names = graves.get(self.domain.rstrip("s"), set())
        stamp = (tuple(sorted(entries)), frozenset(dead_names), frozenset(dead))
        if stamp == self._stamp:
            return
        keys: dict[bytes, str] = {}
        skipped = 0
        for name, _, _ in stamp[0]:
            path = self.directory / name
            try:
                public = _public_key(path)
            except (OSError, ValueError) as exc:
                skipped += 1
                log.warning("%s: skipping %s: %s", self.domain, path, clip(str(exc), 120))
                continue
            holder = name[:-len(".key")]
            if holder in dead_names or public in dead:
                skipped += 1
                log.warning("%s: skipping %s: its %s was revoked (%s)", self.domain, path,
                            "name" if holder in dead_names else "key", self.keys_dir / REVOKED)
                continue
            keys.setdefault(public, holder)
        names = set(keys.values())
        self._gone |= self._names - names
        self._keys, self._stamp, self._names = keys, stamp, names
        log.info("%s: %d allowed keys in %s%s", self.domain, len(keys), self.directory,
                 f" ({skipped} files skipped)" if skipped else "")


_RESCAN_S = 0.1
"""An allow-list directory is looked at no more often than this (a handshake flood)."""


def _public_key(path: Path) -> bytes:
    if path.is_dir():
        raise ValueError("a directory, not a key file")
    public, _ = zmq.auth.load_certificate(path)
    if len(public) != 40:
        raise ValueError("the public key is not 40 Z85 characters")
    try:
        z85.decode(public)
    except Exception:
        raise ValueError("the public key is not valid Z85") from None
    return public


class Gatekeeper:
    """The ZAP handler (ZeroMQ RFC 27) for the router's CURVE sockets: one allow-list per
    domain ("workers", "clients"). An admitted peer's messages carry its key's name as
    their User-Id. Refusals are counted in `refused` and logged aggregated (the first at
    once, then a count per minute with the first and last address). Nothing a handshake
    carries can stop the handler: any failure is answered "500" and logged."""

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, ctx: zmq.Context, keys: Keys, loop: asyncio.AbstractEventLoop, *,
                 log_window: float = 60.0) -> None:
        self.refused: Counter[str] = Counter()
        self.lists = {domain: AllowList(keys.allowed(domain.rstrip("s")), domain,
                                        keys.directory)
                      for domain in ("workers", "clients")}
        for domain, allow in self.lists.items():
            if not allow.directory.is_dir():
                log.warning("no %s allow-list (%s): every %s will be refused", domain,
                            allow.directory, domain.rstrip("s"))
        self.throttle = Throttle(log, log_window)
        self._loop = loop
        sock = ctx.socket(zmq.ROUTER)  # libzmq's ZAP requests come with a REQ envelope
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.ENDPOINT)
        self._channel = Channel(sock, self._on_request, loop, max_frames=16)

    def close(self) -> None:
        self._channel.close()

    def revoked(self, now: float) -> dict[str, set[str]]:
        """Per domain, the names whose keys left its allow-list since the last call."""
        return {domain: gone for domain, allow in self.lists.items()
                if (gone := allow.poll(now))}

    def admits(self, domain: str, sender: str) -> bool:
        """Does a message's sender ("key:NAME") still hold an admitted key? (A CURVE
        session outlives its key's removal: messages keep coming with its name.)"""
        allow = self.lists.get(domain)
        if allow is None or not sender.startswith("key:"):
            return True
        return sender[len("key:"):] in allow.names()

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) < 4 or frames[1] != b"":
            return  # not from libzmq: nobody waits for an answer
        envelope, request = frames[:2], frames[2:]
        request_id = request[1] if len(request) > 1 else b""
        try:
            status, text, user = self._decide(request)
        except Exception:
            log.exception("ZAP handler failed; refusing the handshake")
            status, text, user = b"500", b"internal error", b""
        try:
            self._channel.send([*envelope, b"1.0", request_id, status, text, user, b""])
        except zmq.ZMQError as exc:
            log.warning("cannot answer a ZAP request: %s", exc)

    def _decide(self, request: list[bytes]) -> tuple[bytes, bytes, bytes]:
        if len(request) < 6 or request[0] != b"1.0":
            return b"400", b"malformed ZAP request", b""
        domain = request[2].decode("utf-8", "replace")
        address = request[3].decode("utf-8", "replace")
        mechanism, credentials = request[5], request[6:]
        if domain == "join":  # any key, to redeem a join token: its User-Id is the key
            # and the address it came from ("KEY ADDRESS": can it reach what it joins?)
            if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
                return self._refuse(domain, address, "CURVE keys required")
            return b"200", b"OK", z85.encode(credentials[0]) + b" " + address[:64].encode()
        allow = self.lists.get(domain)
        if allow is None:
            return self._refuse(domain, address, "unknown domain")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return self._refuse(domain, address, "CURVE keys required")
        name = allow.lookup(z85.encode(credentials[0]), self._loop.time())
        if name is None:
            return self._refuse(domain, address, "unknown key")
        return b"200", b"OK", name.encode()

    def _refuse(self, domain: str, address: str, reason: str) -> tuple[bytes, bytes, bytes]:
        self.refused[domain if domain in self.lists else "?"] += 1
        peer = domain.rstrip("s") if domain in self.lists else "peer"
        self.throttle.log(self._loop.time(), logging.WARNING, f"refused {domain} {reason}",
                          "refused a %s connection from %s: %s", peer, clip(address, 60),
                          reason, detail=address)
        return b"400", reason.encode(), b""


def is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint (tcp://..., ipc://..., or HOST:PORT) is reachable only
    from this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint if "://" in endpoint else f"tcp://{endpoint}").hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"
