"""Shared fixtures: a tiny real GGUF model and real pichat processes.

No test picks a "free" port and hopes it stays free: daemons bind port 0 and the tests
read where they listen (the router's --ready-file, a socket's LAST_ENDPOINT)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import RouterUnavailable
from pichat.security import resolve_keys

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import write_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# Hermetic: no test picks up the keys of whoever runs it (~/.config/pichat/keys); the
# security tests make their own.
os.environ["PICHAT_KEYS"] = "off"
# No test looks for a router on the machine's LAN (mDNS): only the fault lab does, in its
# own namespaces (it turns discovery back on for its hosts).
os.environ["PICHAT_DISCOVERY"] = "false"
# ... nor writes conversations into theirs (~/.local/state/pichat): routers share one
# store of this run; tests about the store give each router its own (--db).
os.environ["PICHAT_DB"] = os.path.join(tempfile.mkdtemp(prefix="pichat-test-db-"),
                                       "conversations.db")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-weight llama GGUF with a ChatML template (~0.5 MB)."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server of this session (tests/pg.py); skipped, with the reason,
    where it cannot start."""
    from pg import PostgresServer

    server, why = PostgresServer.start()
    if server is None:
        pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd():
    """A real one-member etcd of this session (tests/etcd.py); skipped, with the reason,
    where it cannot start. A test keeps its keys under a prefix of its own."""
    from etcd import EtcdCluster

    cluster, why = EtcdCluster.start(1)
    if cluster is None:
        pytest.skip(why)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model, installed by `make install` (skipped only if it is absent)."""
    from pichat.errors import ModelNotFound
    from pichat.models import resolve

    try:
        return resolve("default")[0]
    except ModelNotFound as exc:  # pragma: no cover - make test always installs it
        pytest.skip(f"default model not installed: {exc}")


def wait_for_file(path: Path, proc: Proc, timeout: float = 60.0) -> str:
    """The contents of `path` once `proc` has written it (it fails if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} did not get ready:\n{proc.output()}")
        time.sleep(0.02)
    return path.read_text()


class Proc:
    """A `python -m pichat ...` child process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pichat", *argv], stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def wait_output(self, text: str, timeout: float = 5.0) -> str:
        """The output once it holds `text` (or as it is when `timeout` runs out)."""
        deadline = time.monotonic() + timeout
        while text not in (out := self.output()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return out

    def close(self) -> None:
        if self.alive():
            self.kill()
        self._log.close()


class Cluster:
    """Real router and worker processes on loopback. The first router binds port 0 for
    each endpoint; a router started again (a restart) binds the same ports."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.client_endpoint = ""
        self.worker_endpoint = ""
        self.http_url = ""
        """http://127.0.0.1:PORT of the router's HTTP face (when it has one)."""
        self.keys: Path | None = None
        """The keys directory clients use (None: no keys)."""
        self.join_endpoint = ""

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.log_dir, env)
        self.procs.append(proc)
        return proc

    def router(self, *args: str, name: str = "router", host: str = "127.0.0.1") -> Proc:
        """Start a router and wait until it is ready (everything it serves is up)."""
        ready = self.log_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        port = lambda endpoint: endpoint.rsplit(":", 1)[1] if endpoint else "0"  # noqa: E731
        http = f"{host}:{port(self.http_url)}"
        proc = self.spawn(name, [
            "router", "--clients-bind", f"tcp://{host}:{port(self.client_endpoint)}",
            "--workers-bind", f"tcp://{host}:{port(self.worker_endpoint)}",
            "--join-bind", f"tcp://{host}:0", "--no-discovery",
            "--heartbeat", "0.5", "--http", http, "--ready-file", str(ready), *args])
        bound = json.loads(wait_for_file(ready, proc))
        local = lambda e: e.replace("0.0.0.0", "127.0.0.1")  # noqa: E731
        self.client_endpoint = local(bound["clients"])
        self.worker_endpoint = local(bound["workers"])
        self.http_url = local(bound["http"])
        self.join_endpoint = local(bound.get("join", ""))
        return proc

    def worker(self, name: str, *args: str, backend: str = "sim",
               also: Cluster | None = None) -> Proc:
        """A worker of this router (and of `also`'s too: the HA layout)."""
        routers = self.worker_endpoint + (f",{also.worker_endpoint}" if also else "")
        return self.spawn(name, [
            "worker", "--router", routers, "--name", name, "--backend", backend,
            "--no-discovery",
            "--heartbeat", "0.5", "--threads", "1", *args])

    def client(self, **kwargs) -> Client:
        keys = resolve_keys(str(self.keys)) if self.keys else None
        return Client(ClientConfig(router=self.client_endpoint, keys=keys, **kwargs))

    async def wait_workers(self, n: int, timeout: float = 60.0, *, names: set[str] | None = None
                           ) -> dict:
        """Until the router lists `n` workers (or exactly `names`)."""
        def alive() -> None:
            for proc in self.procs:
                if not proc.alive() and proc.popen.returncode not in (0, -9, -15):
                    raise AssertionError(f"{proc.name} exited:\n{proc.output()}")

        async with self.client(silence_timeout=2.0) as client:
            try:
                return await client.wait_for_workers(n, names=names, timeout=timeout,
                                                     check=alive)
            except RouterUnavailable as exc:
                raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-4000:]}" for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(c.logs())
    c.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
