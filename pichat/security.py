"""CurveZMQ keys and ZAP authentication for every pichat link.

A keys directory (`--keys`, default ~/.config/pichat/keys when it exists) holds:

    router.key, router.key_secret     the router's key pair; router.key goes to every Pi
    worker.key, worker.key_secret     a worker key pair (each Pi may have its own: --key-name)
    client.key, client.key_secret     a client key pair
    workers/*.key                     the router admits workers with these public keys
    clients/*.key                     ... and clients with these
    api-keys                          HTTP API keys, one per line (for --api-key-file)

`pichat keygen` writes it. The router's sockets are CURVE servers; a ZAP handler
(pyzmq's asyncio authenticator) admits a peer only if its public key is in the socket's
allow-list directory, re-read when the directory changes, and logs every refusal with
the peer's address. Workers and clients are CURVE clients of the router's public key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from pichat.errors import PichatError
from pichat.transport import Channel, configure

__all__ = [
    "DEFAULT_KEYS_DIR",
    "Keys",
    "resolve_keys",
    "keygen",
    "Gatekeeper",
    "watch_handshakes",
    "Link",
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
            if not entry.exists():
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


class _Allowed:
    """The public keys in a directory, re-read when the directory changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: float | None = None
        self._keys: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            stamp = self.directory.stat().st_mtime_ns
        except OSError:
            return False
        if stamp != self._stamp:
            self._keys = set(zmq.auth.load_certificates(self.directory))
            self._stamp = stamp
            log.info("%s: %d allowed keys in %s", domain, len(self._keys), self.directory)
        return key in self._keys


class Gatekeeper(AsyncioAuthenticator):
    """ZAP for the router: one allow-list directory per domain ("workers", "clients");
    every refused peer is logged with its address and counted in `refused`."""

    def __init__(self, context: zmq.Context, keys: Keys) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.refused: Counter[str] = Counter()
        self._keys = keys
        self._peer = ("", "")

    def start(self) -> None:
        super().start()
        for domain in ("workers", "clients"):
            directory = self._keys.directory / domain
            if not directory.is_dir():
                log.warning("no %s allow-list (%s): every %s will be refused", domain,
                            directory, domain.rstrip("s"))
            self.configure_curve_callback(domain, _Allowed(directory))

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 4:
            self._peer = (msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"))
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            domain, address = self._peer
            self.refused[domain or "?"] += 1
            log.warning("refused a %s connection from %s: %s", domain.rstrip("s") or "peer",
                        address or "?", status_text.decode("utf-8", "replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the router refused this key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (keys or protocol)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed",
}


def watch_handshakes(sock: zmq.Socket, loop: asyncio.AbstractEventLoop,
                     on_failure: Callable[[str], None]) -> Channel:
    """Report failed CURVE handshakes of `sock` (a refused key looks like silence
    otherwise). Close the returned channel before the socket."""
    events = 0
    for event in _HANDSHAKE_FAILURES:
        events |= event
    monitor = sock.get_monitor_socket(events)

    def handle(frames: list[bytes]) -> None:
        event = parse_monitor_message(frames)
        reason = _HANDSHAKE_FAILURES.get(event["event"])
        if reason:
            on_failure(f"{reason} (endpoint {event['endpoint'].decode(errors='replace')})")

    return Channel(monitor, handle, loop)


class Link:
    """A worker's or client's DEALER connection to the router: a `Channel`, secured with
    `keys` when given, and watched for refused handshakes."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, keys: Keys | None, key_name: str,
                 max_message_bytes: int, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[list[bytes]], None],
                 on_refused: Callable[[str], None]) -> None:
        sock = ctx.socket(zmq.DEALER)
        configure(sock, max_message_bytes=max_message_bytes)
        self._monitor: Channel | None = None
        if keys is not None:
            keys.secure_client(sock, key_name)
            self._monitor = watch_handshakes(sock, loop, on_refused)
        sock.connect(endpoint)
        self.channel = Channel(sock, on_message, loop)

    def close(self, linger_ms: int = 0) -> None:
        if self._monitor is not None:
            self.channel.sock.disable_monitor()
            self._monitor.close()
            self._monitor = None
        self.channel.close(linger_ms)


def is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint (tcp://..., ipc://..., or HOST:PORT) is reachable only
    from this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlparse(endpoint if "://" in endpoint else f"tcp://{endpoint}").hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"
