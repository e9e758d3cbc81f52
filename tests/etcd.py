"""Real etcd members for the tests (Debian's etcd-server), each in a private directory on
loopback ports of its own: `EtcdCluster.start(n)` returns None with the reason when etcd
cannot start here."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["EtcdCluster"]


def _free_ports(n: int) -> list[int]:
    """Ports the kernel just handed out (etcd cannot bind port 0 and say which it got; a
    member that loses its port to another program fails to start and is started again on
    new ones)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    def __init__(self, root: Path, n: int) -> None:
        self.root = root
        self.names = [f"m{i}" for i in range(n)]
        ports = _free_ports(2 * n)
        self.clients = [f"http://127.0.0.1:{p}" for p in ports[:n]]
        self.peers = [f"http://127.0.0.1:{p}" for p in ports[n:]]
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.logs: list = [None] * n

    @classmethod
    def start(cls, n: int = 1) -> tuple[EtcdCluster | None, str]:
        binary = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists()
                                          else None)
        if binary is None:
            return None, "etcd is not installed (apt-get install etcd-server)"
        why = ""
        for _ in range(3):
            cluster = cls(Path(tempfile.mkdtemp(prefix="pichat-etcd-")), n)
            for i in range(n):
                cluster.launch(i)
            try:
                cluster.wait()
                return cluster, ""
            except (OSError, TimeoutError, RuntimeError) as exc:
                why = str(exc)
                cluster.stop()
        return None, f"etcd did not start here: {why}"

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(c.removeprefix("http://") for c in self.clients)

    def launch(self, i: int) -> None:
        cluster = ",".join(f"{m}={p}" for m, p in zip(self.names, self.peers))
        data = self.root / self.names[i]
        self.logs[i] = open(self.root / f"{self.names[i]}.log", "ab")
        self.procs[i] = subprocess.Popen(
            ["etcd", "--name", self.names[i], "--data-dir", str(data),
             "--listen-client-urls", self.clients[i], "--advertise-client-urls",
             self.clients[i], "--listen-peer-urls", self.peers[i],
             "--initial-advertise-peer-urls", self.peers[i], "--initial-cluster", cluster,
             "--initial-cluster-state", "existing" if data.exists() else "new",
             "--initial-cluster-token", self.root.name, "--unsafe-no-fsync",
             "--heartbeat-interval", "100", "--election-timeout", "1000", "--pre-vote",
             "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=self.logs[i])

    def call(self, i: int, path: str, body: dict, timeout: float = 2.0) -> dict:
        request = urllib.request.Request(self.clients[i] + "/v3/" + path,
                                         json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def wait(self, timeout: float = 60.0) -> None:
        """Until every running member serves a linearizable read (a leader is elected)."""
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            while True:
                if proc.poll() is not None:
                    log = (self.root / f"{self.names[i]}.log").read_text()[-400:]
                    raise RuntimeError(f"member {self.names[i]} exited: {log.strip()}")
                try:
                    self.call(i, "kv/range", {"key": base64.b64encode(b"ready").decode()},
                              timeout=1.0)
                    break
                except (OSError, urllib.error.URLError, ValueError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"member {self.names[i]} is not serving") from None
                    time.sleep(0.1)

    def leader(self) -> int:
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            status = self.call(i, "maintenance/status", {})
            if status.get("leader") == status["header"]["member_id"]:
                return i
        raise RuntimeError("no leader")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.kill()
            proc.wait()
            self.procs[i] = None
            self.logs[i].close()

    def stop(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        shutil.rmtree(self.root, ignore_errors=True)
