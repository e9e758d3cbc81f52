"""`pichat up`: a router and N workers as child processes of this one.

The children run in their own sessions, so a Ctrl-C in the terminal reaches only us; we
then stop them in order (workers, then the router) with SIGTERM, and SIGKILL whatever
is still running after a grace period. If this process is killed outright, the kernel
sends the children SIGTERM (PR_SET_PDEATHSIG), so nothing is left running.

A child that dies is started again after a backoff (1 s, doubling to 30 s, reset once it
has run for a minute), as compose's restart policy would; the router counts a worker's
registrations, so `pichat status` shows the restarts. The router is started first and
says where it listens (--ready-file), so any port may be 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pichat.client import Client
from pichat.config import (
    DEFAULT_CLIENT_ENDPOINT,
    DEFAULT_WORKER_ENDPOINT,
    Backend,
    ClientConfig,
    WorkerConfig,
    default_of,
)
from pichat.console import format_stats
from pichat.errors import PichatError
from pichat.protocol import ChatMessage, Sampling
from pichat.router.policy.scheduler import Policy, SchedulerConfig
from pichat.security import resolve_keys
from pichat.transport import port_of

__all__ = ["ClusterConfig", "LocalCluster", "run_cluster"]

log = logging.getLogger(__name__)

_GRACE = 45.0
"""Workers drain (finish running requests) for up to 30 s on SIGTERM."""
_BACKOFF_START = 1.0
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0
"""A child that ran this long before dying starts again after the shortest backoff."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    workers: int = 2
    backend: Backend = default_of(WorkerConfig, "backend")
    model: str = default_of(WorkerConfig, "model")
    slots: int = default_of(WorkerConfig, "slots")
    threads: int = 1
    """Threads per worker (`pichat up` gives each its share of the CPUs)."""
    ctx: int = default_of(WorkerConfig, "ctx")
    policy: Policy = default_of(SchedulerConfig, "policy")
    clients_bind: str = DEFAULT_CLIENT_ENDPOINT
    workers_bind: str = DEFAULT_WORKER_ENDPOINT
    http: str = "127.0.0.1:8080"
    keys: str = "off"
    """The keys directory for every link ("off": none)."""
    log_level: Literal["debug", "info", "warning", "error"] | str = "warning"
    ready_timeout: float = 600.0
    worker_args: tuple[str, ...] = ()
    """More `pichat worker` options, passed to every worker."""


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _connect_endpoint(bound: str) -> str:
    """Where to connect for a bound endpoint (tcp://0.0.0.0:P -> tcp://127.0.0.1:P)."""
    return bound.replace("//*:", "//127.0.0.1:").replace("//0.0.0.0:", "//127.0.0.1:")


@dataclass(slots=True)
class _Child:
    role: str
    argv: Callable[[], list[str]]
    """The command line (a function: a router started again reuses its bound ports)."""
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = _BACKOFF_START
    due: float | None = None
    """When a dead child is started again."""
    exits: list[int] = field(default_factory=list)


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.endpoints: dict[str, str] = {}
        """What the router bound: clients, workers, http (known once it is ready)."""
        self._dir = Path(tempfile.mkdtemp(prefix="pichat-up-"))
        self._ready = self._dir / "router.ready"
        host = socket.gethostname()
        self.names = [f"{host}-w{i + 1}" for i in range(config.workers)]
        self.router = _Child("router", self._router_argv)
        self.workers = [_Child(f"worker {i + 1}", lambda n=n: self._worker_argv(n))
                        for i, n in enumerate(self.names)]

    @property
    def client_endpoint(self) -> str:
        return _connect_endpoint(self.endpoints.get("clients", self.config.clients_bind))

    @property
    def http_url(self) -> str:
        return self.endpoints.get("http", "")

    def client_config(self, **kwargs: Any) -> ClientConfig:
        return ClientConfig(router=self.client_endpoint, keys=resolve_keys(self.config.keys),
                            **kwargs)

    def _router_argv(self) -> list[str]:
        cfg = self.config
        clients, workers, http = cfg.clients_bind, cfg.workers_bind, cfg.http
        if self.endpoints:  # started again: the ports it had, so the workers find it
            clients = f"{clients.rsplit(':', 1)[0]}:{port_of(self.endpoints['clients'])}"
            workers = f"{workers.rsplit(':', 1)[0]}:{port_of(self.endpoints['workers'])}"
            if http != "off" and self.endpoints.get("http"):
                http = f"{http.rsplit(':', 1)[0]}:{port_of(self.endpoints['http'])}"
        return [sys.executable, "-m", "pichat", "router", "--clients-bind", clients,
                "--workers-bind", workers, "--join-bind", "off", "--no-discovery",
                "--policy", cfg.policy,
                "--http", http,
                "--keys", cfg.keys, "--log-level", cfg.log_level,
                "--ready-file", str(self._ready)]

    def _worker_argv(self, name: str) -> list[str]:
        cfg = self.config
        # Each worker its own key pair (made at start): a name, and the sessions leased to
        # it, belong to one key; no worker can speak as another.
        key = ["--key-name", name] if cfg.keys != "off" else []
        return [sys.executable, "-m", "pichat", "worker",
                "--router", _connect_endpoint(self.endpoints["workers"]), "--name", name,
                "--backend", cfg.backend, "--model", cfg.model, "--slots", str(cfg.slots),
                "--threads", str(cfg.threads), "--ctx", str(cfg.ctx), "--keys", cfg.keys,
                *key, "--log-level", cfg.log_level, "--no-discovery", *cfg.worker_args]

    def start(self) -> None:
        """Start the router, wait until it is ready, then start the workers."""
        cfg = self.config
        if cfg.backend == "llama":
            # Assemble a named model once here (and fail early, with a clear message),
            # rather than in N workers at once.
            from pichat.models import resolve

            resolve(cfg.model)
        if cfg.keys != "off":
            from pichat.security import keygen

            keygen(Path(cfg.keys), workers=tuple(self.names))
        self._spawn(self.router)
        self._wait_router()
        for child in self.workers:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        if child is self.router:
            self._ready.unlink(missing_ok=True)
        child.proc = subprocess.Popen(child.argv(), preexec_fn=_die_with_parent)
        child.started = time.monotonic()
        child.due = None

    def _wait_router(self) -> None:
        deadline = time.monotonic() + 60
        while not self._ready.exists():
            proc = self.router.proc
            if proc is not None and proc.poll() is not None:
                raise PichatError(f"the router exited during start-up (exit {proc.returncode})")
            if time.monotonic() > deadline:
                raise PichatError("the router did not get ready within 60s")
            time.sleep(0.05)
        self.endpoints = json.loads(self._ready.read_text())

    def supervise(self, say: Callable[[str], None]) -> None:
        """Start dead children again, each after its backoff (call it every second)."""
        now = time.monotonic()
        for child in [self.router, *self.workers]:
            proc = child.proc
            if proc is None or proc.poll() is None:
                continue
            if child.due is None:
                ran = now - child.started
                child.backoff = _BACKOFF_START if ran >= _STABLE_AFTER else child.backoff
                child.due = now + child.backoff
                child.exits.append(proc.returncode)
                say(f"pichat: {child.role} exited (code {proc.returncode}); starting it again "
                    f"in {child.backoff:.0f}s")
                child.backoff = min(_BACKOFF_MAX, child.backoff * 2)
            elif now >= child.due:
                child.restarts += 1
                self._spawn(child)
                if child is self.router:
                    self._wait_router()

    def dead(self) -> list[str]:
        """Children that exited, as 'role (exit code)'."""
        return [f"{c.role} (exit {c.proc.returncode})" for c in [self.router, *self.workers]
                if c.proc is not None and c.proc.poll() is not None]

    async def wait_ready(self, client: Client) -> None:
        """Until every worker has registered with the router."""
        def alive() -> None:
            if dead := self.dead():
                raise PichatError(f"exited during start-up: {', '.join(dead)}")

        await client.wait_for_workers(self.config.workers, timeout=self.config.ready_timeout,
                                      check=alive)

    def stop(self) -> None:
        """Workers first (they say goodbye to the router), then the router."""
        for group in (self.workers, [self.router]):
            procs = [c.proc for c in group if c.proc is not None]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + _GRACE
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop in %.0fs: killing it", proc.pid, _GRACE)
                    proc.kill()
                    proc.wait()
        self._ready.unlink(missing_ok=True)
        try:
            self._dir.rmdir()
        except OSError:
            pass


def _web_link(url: str, keys: str) -> str:
    """The chat page's address, with the API key in the fragment (browsers never send
    the fragment to a server, so the key stays out of every log)."""
    if not url:
        return ""
    api = Path(keys) / "api-keys" if keys != "off" else None
    key = ""
    if api is not None and api.is_file():
        key = next((k for k in (line.split("#", 1)[0].strip()
                                for line in api.read_text().splitlines()) if k), "")
    return f"{url}/#key={key}" if key else f"{url}/"


async def run_cluster(config: ClusterConfig, *, prompt: str | None = None, once: bool = False,
                      say: Callable[[str], None] = log.info,
                      write: Callable[[str], None] | None = None) -> int:
    """Run until Ctrl-C / SIGTERM (or, with `once`, until `prompt` is answered).

    `say` reports progress to the user; `write` shows the prompt's answer as it streams.
    """
    write = write or say
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    cluster = LocalCluster(config)
    try:
        await asyncio.to_thread(cluster.start)
        async with Client(cluster.client_config()) as client:
            await cluster.wait_ready(client)
            link = _web_link(cluster.http_url, config.keys)
            web = f"; web chat at {link}" if link else ""
            say(f"pichat: {config.workers} workers ready behind {cluster.client_endpoint}{web}. "
                "Try ./scripts/send_prompt.sh \"Hello\" in another shell; Ctrl-C stops it all.")
            if prompt:
                write(f"> {prompt}\n")
                reply = await client.chat([ChatMessage("user", prompt)],
                                          sampling=Sampling(max_tokens=200), on_text=write)
                write(f"\n{format_stats(reply)}\n")
                if once:
                    return 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                await asyncio.to_thread(cluster.supervise, say)
        return 0
    finally:
        say("pichat: stopping the cluster")
        cluster.stop()
