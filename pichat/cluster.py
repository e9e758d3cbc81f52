"""`pichat up`: a router and N workers as child processes of this one.

The children run in their own sessions, so a Ctrl-C in the terminal reaches only us; we
then stop them in order (workers, then the router) with SIGTERM, and SIGKILL whatever
is still running after a grace period. If this process is killed outright, the kernel
sends the children SIGTERM (PR_SET_PDEATHSIG), so nothing is left running.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pichat.client import Client
from pichat.config import Backend, ClientConfig
from pichat.console import format_stats
from pichat.errors import PichatError
from pichat.protocol import ChatMessage, Sampling
from pichat.router.scheduler import Policy
from pichat.security import resolve_keys

__all__ = ["ClusterConfig", "LocalCluster", "run_cluster"]

log = logging.getLogger(__name__)

_GRACE = 45.0
"""Workers drain (finish running requests) for up to 30 s on SIGTERM."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    workers: int = 2
    backend: Backend = "llama"
    model: str = "default"
    slots: int = 1
    threads: int = 1
    ctx: int = 4096
    policy: Policy = "affinity"
    clients_bind: str = "tcp://127.0.0.1:5555"
    workers_bind: str = "tcp://127.0.0.1:5556"
    http: str = "off"
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


def _connect_endpoint(bind: str) -> str:
    """The endpoint to connect to for a bind endpoint (tcp://*:P -> tcp://127.0.0.1:P)."""
    return bind.replace("//*:", "//127.0.0.1:").replace("//0.0.0.0:", "//127.0.0.1:")


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.router: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def client_endpoint(self) -> str:
        return _connect_endpoint(self.config.clients_bind)

    def client_config(self, **kwargs: Any) -> ClientConfig:
        return ClientConfig(router=self.client_endpoint, keys=resolve_keys(self.config.keys),
                            **kwargs)

    def start(self) -> None:
        cfg = self.config
        if cfg.backend == "llama":
            # Assemble a named model once here (and fail early, with a clear message),
            # rather than in N workers at once.
            from pichat.models import resolve

            resolve(cfg.model)
        base = [sys.executable, "-m", "pichat"]
        self.router = self._spawn(base + [
            "router", "--clients-bind", cfg.clients_bind, "--workers-bind", cfg.workers_bind,
            "--policy", cfg.policy, "--http", cfg.http, "--keys", cfg.keys,
            "--log-level", cfg.log_level])
        host = socket.gethostname()
        for i in range(cfg.workers):
            self.workers.append(self._spawn(base + [
                "worker", "--router", _connect_endpoint(cfg.workers_bind),
                "--name", f"{host}-w{i + 1}", "--backend", cfg.backend, "--model", cfg.model,
                "--slots", str(cfg.slots), "--threads", str(cfg.threads),
                "--ctx", str(cfg.ctx), "--keys", cfg.keys, "--log-level", cfg.log_level,
                *cfg.worker_args]))

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, preexec_fn=_die_with_parent)

    def dead(self) -> list[str]:
        """Children that exited, as 'role (exit code)'."""
        out = []
        if self.router is not None and self.router.poll() is not None:
            out.append(f"router (exit {self.router.returncode})")
        out += [f"worker {i + 1} (exit {w.returncode})"
                for i, w in enumerate(self.workers) if w.poll() is not None]
        return out

    async def wait_ready(self, client: Client) -> None:
        """Until every worker has registered with the router."""
        deadline = time.monotonic() + self.config.ready_timeout
        while True:
            if dead := self.dead():
                raise PichatError(f"exited during start-up: {', '.join(dead)}")
            try:
                snapshot = await client.status()
                if len(snapshot.get("workers", [])) >= self.config.workers:
                    return
            except PichatError:
                pass
            if time.monotonic() > deadline:
                raise PichatError("the workers did not register in time")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        """Workers first (they say goodbye to the router), then the router."""
        for group in (self.workers, [self.router] if self.router else []):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + _GRACE
            for proc in group:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop in %.0fs: killing it", proc.pid, _GRACE)
                    proc.kill()
                    proc.wait()


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
        cluster.start()
        async with Client(cluster.client_config()) as client:
            await cluster.wait_ready(client)
            web = f", web chat at http://{config.http}/" if config.http != "off" else ""
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
                if dead := cluster.dead():
                    say(f"pichat: {', '.join(dead)} exited; stopping the cluster")
                    return 1
        return 0
    finally:
        say("pichat: stopping the cluster")
        cluster.stop()
