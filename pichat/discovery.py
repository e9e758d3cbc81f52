"""Finding the router on the LAN: mDNS / DNS-SD (`_pichat._tcp.local.`, python-zeroconf).

A router with keys announces itself: its addresses, its ports (workers, clients, join)
and its CURVE public key in the TXT record. A worker or client that holds the router's
public key (it joined: pichat/invites.py) and has no router address, or has lost the
one it had (the router's address changed after a DHCP renewal), looks for announcements
and takes only one whose key is the key it holds: an announcement is never trusted by
itself, and one with another key (a rogue announcer, another cluster) is ignored and
logged. A found address is used and kept only once a CURVE handshake with that key
succeeded there (only the router's secret can answer it): a forged announcement is
neither followed nor saved. `--no-discovery` switches it all off; static addresses keep working.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from pichat.config import host_name
from pichat.errors import PichatError

__all__ = ["SERVICE", "Announcer", "find", "answers", "proven", "relocate"]

log = logging.getLogger(__name__)

SERVICE = "_pichat._tcp.local."


def _addresses() -> list[bytes]:
    """This host's IPv4 addresses (not loopback)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(socket.inet_aton(ip.ip))
    return out


class Announcer:
    """The router's announcement, while it runs."""

    def __init__(self, key: str, ports: dict[str, int], name: str | None = None) -> None:
        self.key = key
        self.ports = ports
        self.name = name or host_name()
        self._zc: Any = None
        self._info: Any = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        addresses = _addresses()
        if not addresses:
            log.info("no LAN address to announce the router on (mDNS off)")
            return
        props = {"key": self.key, "v": "1", **{k: str(v) for k, v in self.ports.items()}}
        self._info = AsyncServiceInfo(SERVICE, f"{self.name}.{SERVICE}", addresses=addresses,
                                      port=self.ports["workers"], properties=props,
                                      server=f"{self.name}.local.")
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        await self._zc.async_register_service(self._info, allow_name_change=True)
        log.info("announced on the LAN (mDNS %s) at %s", SERVICE,
                 ", ".join(socket.inet_ntoa(a) for a in addresses))

    async def close(self) -> None:
        if self._zc is not None:
            try:
                await self._zc.async_unregister_service(self._info)
            finally:
                await self._zc.async_close()
            self._zc = None


async def find(key: str, role: str, timeout: float = 3.0,
               avoid: frozenset[str] = frozenset()) -> str | None:
    """The endpoint (`tcp://ADDRESS:PORT`) of `role` ("workers", "clients") of an
    announced router whose public key is `key`, other than those in `avoid` (routers
    sharing the key that this host already uses); None if none answers in `timeout`."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    found: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    ignored: set[str] = set()
    pending: set[asyncio.Task] = set()

    async def look(name: str) -> None:
        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(zc.zeroconf, 1500):
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if props.get("key") != key:
            if name not in ignored:
                ignored.add(name)
                log.warning("ignoring a pichat router announced as %s at %s: not the key "
                            "this host holds", name, ", ".join(addresses) or "?")
            return
        port = props.get(role, "")
        endpoint = f"tcp://{addresses[0]}:{port}" if addresses else ""
        if port.isdigit() and endpoint and endpoint not in avoid and not found.done():
            found.set_result(endpoint)

    def on_change(zeroconf: Any, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(look(name))
            pending.add(task)
            task.add_done_callback(pending.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE, handlers=[on_change])
    try:
        return await asyncio.wait_for(asyncio.shield(found), timeout)
    except TimeoutError:
        return None
    finally:
        await browser.async_cancel()
        for task in pending:
            task.cancel()
        await zc.async_close()


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Does anything accept a TCP connection at `endpoint` (tcp://HOST:PORT)? Other
    transports are taken as answering."""
    if not endpoint.startswith("tcp://"):
        return True
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


async def proven(endpoint: str, keys: Any, key_name: str, timeout: float = 3.0) -> bool:
    """Does the listener at `endpoint` hold the router's secret key? A CURVE handshake
    with the router's public key (as `key_name`'s key pair) must succeed: only a holder of
    the secret can answer it. A silent listener, another key or no CURVE at all: False."""
    import zmq
    import zmq.asyncio
    from zmq.utils.monitor import parse_monitor_message

    failed = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = None
    try:
        keys.secure_client(sock, key_name)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | failed)
        sock.connect(endpoint)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                frames = await asyncio.wait_for(monitor.recv_multipart(), left)
            except TimeoutError:
                break
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
            if event & failed:
                return False
        return False
    except (zmq.ZMQError, PichatError, OSError) as exc:
        log.debug("cannot try the router at %s: %s", endpoint, exc)
        return False
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


async def resolved(endpoints: frozenset[str], timeout: float = 2.0) -> frozenset[str]:
    """`endpoints` and each as its host's IPv4 addresses (tcp://router2:5556 ->
    tcp://10.0.2.3:5556): an announcement names an address, the worker may have a name
    (Swarm's service names). A name that does not resolve in `timeout` stays as it is."""
    loop = asyncio.get_running_loop()
    out = set(endpoints)
    for endpoint in endpoints:
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        if not host or not port.isdigit():
            continue
        try:
            found = await asyncio.wait_for(loop.getaddrinfo(
                host.strip("[]"), int(port), family=socket.AF_INET, type=socket.SOCK_STREAM),
                timeout)
        except (OSError, TimeoutError, UnicodeError):
            continue
        out.update(f"tcp://{info[4][0]}:{port}" for info in found)
    return frozenset(out)


async def relocate(keys_dir: Any, router_key: str, role: str, was: str | None,
                   timeout: float = 3.0, *, keys: Any = None, key_name: str = "",
                   avoid: frozenset[str] = frozenset(),
                   finder: Callable[[str, str, float, frozenset[str]],
                                    Awaitable[str | None]] | None = None
                   ) -> str | None:
    """Look on the LAN for the router whose key is `router_key`, other than those in
    `avoid` (the other routers this host is registered with, by name or address: with two
    routers sharing a key, a silent one must not be taken for the other); if found
    somewhere other than `was`, and the listener there proves it holds the router's
    secret (`proven`, with `keys` and `key_name`), keep the new endpoint in a joined
    Pi's router.json (`keys_dir`) in place of `was` (the other routers kept there stay),
    so the next start goes there directly. The endpoint, or None (an announcement that
    does not prove the key is not used: a spoofed one would keep this host stuck).
    `finder`: what looks (`find`)."""
    from pichat.invites import ROUTER_FILE, remember_router, stored_router

    try:
        found = await (finder or find)(router_key, role, timeout, await resolved(avoid))
    except (OSError, RuntimeError) as exc:  # no multicast here, or a sandbox (systemd's
        # RestrictAddressFamilies without AF_NETLINK): look no further, but keep going
        log.warning("cannot look for the router on the LAN: %s", exc)
        return None
    if found and found != was:
        if keys is not None and not await proven(found, keys, key_name, timeout):
            log.warning("an announcement of this cluster's router at %s did not prove its "
                        "key (no CURVE handshake): ignored", found)
            return None
        log.info("found the router on the LAN at %s (was %s)", found, was or "none")
        if keys_dir is not None and (keys_dir / ROUTER_FILE).exists():
            try:
                kept = [e for e in (stored_router(keys_dir, role) or "").split(",") if e]
                if was in kept:
                    kept[kept.index(was)] = found
                elif len(kept) <= 1:
                    kept = [found]
                # else `was` came from elsewhere (--router): the kept routers stay
                remember_router(keys_dir, {role: ",".join(dict.fromkeys(kept))})
            except (OSError, PichatError) as exc:
                log.debug("cannot keep the router's new address: %s", exc)
    return found
