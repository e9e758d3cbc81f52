"""What keeping stored conversations through a router's death costs (issue 25's choice of
engine), measured side by side on this machine: a turn (a user message and an answer,
~1.5 KB) written durably, the RAM the engine's processes take, and how long until writes
go on after the member that took them is killed.

    sqlite              pichat's default store: one file, synchronous=FULL (no replica)
    postgres            PostgreSQL alone, fsync on (pichat's --db postgresql://)
    postgres+standby    the same with a synchronous streaming standby (a turn is stored
                        once the standby has it): survives the primary's host
    etcd x3             three etcd members (two routers and a witness), a turn one key,
                        through etcd's HTTP gateway: survives any one member

Run: .venv/bin/python bench/ha_store.py [--turns 200]   (root: PostgreSQL runs as its
own user; needs apt's postgresql and etcd-server)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pichat.memory.store import Message  # noqa: E402

USER = "What should I plant in a small, shady vegetable bed in Lisbon in October? " * 4
ANSWER = ("In a shady bed in autumn, leafy greens do best: lettuce, spinach, chard, rocket "
          "and kale tolerate a few hours of sun and the cool nights. ") * 8


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    found = [pid]
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(path.split("/")[2]))
    return found


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _row(name: str, writes: list[float], ram: float, failover: str) -> tuple[str, float, str]:
    """(name, p50 seconds, the printed line)."""
    p50 = statistics.median(writes)
    return name, p50, (f"{name:18s} {p50 * 1000:8.2f} {_pct(writes, 0.9):8.2f} "
                       f"{ram:9.1f}   {failover}")


# --- SQLite ---------------------------------------------------------------------------

async def _turns(store, turns: int) -> list[float]:
    owner = "bench"
    made = await store.create(owner, title="bench")
    times = []
    for _ in range(turns):
        start = time.perf_counter()
        await store.append(owner, made.id, (Message("user", USER), Message("assistant", ANSWER)))
        times.append(time.perf_counter() - start)
    return times


async def sqlite(root: Path, turns: int) -> tuple[str, float, str]:
    from pichat.memory.sqlite import SQLiteStore

    store = await SQLiteStore.open(root / "c.db")
    try:
        times = await _turns(store, turns)
    finally:
        await store.close()
    return _row("sqlite", times, 0.0, "none: the file is on one host")


# --- PostgreSQL --------------------------------------------------------------------------

def _pg(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else (shutil.which(name) or name)


class Postgres:
    def __init__(self, root: Path, name: str, port: int) -> None:
        self.data, self.socket, self.port = root / name, root / f"{name}-socket", port
        self.log = root / f"{name}.log"
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *argv: str) -> None:
        subprocess.run([*self.run_as, *argv], check=True, capture_output=True, timeout=120)

    def start(self, *options: str) -> None:
        self.run("mkdir", "-p", str(self.socket))
        opts = " ".join([f"-k {self.socket}", "-c listen_addresses=''", f"-p {self.port}",
                         *options])
        self.run(_pg("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                 "-o", opts, "start")

    def pids(self) -> list[int]:
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return _children(pid)

    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket}&port={self.port}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, _pg("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)


async def postgres(root: Path, turns: int, standby: bool) -> tuple[str, float, str]:
    from pichat.memory.postgres import PostgresStore

    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    primary = Postgres(root, "primary", 55432)
    primary.run(_pg("initdb"), "-D", str(primary.data), "-A", "trust", "-U", "postgres",
                "-E", "UTF8")
    settings = ["-c wal_level=replica", "-c max_wal_senders=4"]
    if standby:
        settings.append("-c synchronous_standby_names='*'")
    primary.start(*settings)
    servers = [primary]
    try:
        if standby:
            replica = Postgres(root, "standby", 55433)
            replica.run(_pg("pg_basebackup"), "-h", str(primary.socket), "-p",
                        str(primary.port), "-U", "postgres", "-D", str(replica.data), "-R",
                        "-X", "stream")
            replica.start()
            servers.append(replica)
        store = await PostgresStore.open(primary.url())
        try:
            times = await _turns(store, turns)
        finally:
            await store.close()
        ram = _pss_mb([pid for s in servers for pid in s.pids()])
        failover = "none: one host"
        if standby:
            os.kill(primary.pids()[0], signal.SIGKILL)
            start = time.perf_counter()
            replica.run(_pg("pg_ctl"), "-D", str(replica.data), "-w", "promote")
            store = await PostgresStore.open(replica.url())
            try:
                await _turns(store, 1)
            finally:
                await store.close()
            failover = (f"{(time.perf_counter() - start) * 1000:.0f} ms to promote the "
                        "standby and write (detection not counted: Patroni's TTL, 30 s "
                        "by default, needs etcd too)")
        name = "postgres+standby" if standby else "postgres"
        return _row(name, times, ram, failover)
    finally:
        for server in servers:
            server.stop()


# --- etcd ------------------------------------------------------------------------------

class Etcd:
    def __init__(self, root: Path, n: int) -> None:
        self.names = [f"m{i}" for i in range(n)]
        self.clients = [f"http://127.0.0.1:{23790 + i}" for i in range(n)]
        peers = [f"http://127.0.0.1:{23890 + i}" for i in range(n)]
        cluster = ",".join(f"{m}={p}" for m, p in zip(self.names, peers))
        self.procs = [subprocess.Popen(
            [shutil.which("etcd") or "/usr/bin/etcd", "--name", m,
             "--data-dir", str(root / m), "--listen-client-urls", c,
             "--advertise-client-urls", c, "--listen-peer-urls", p,
             "--initial-advertise-peer-urls", p, "--initial-cluster", cluster,
             "--initial-cluster-state", "new", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for m, c, p in zip(self.names, self.clients, peers)]

    @staticmethod
    def call(url: str, path: str, body: dict, timeout: float = 5.0) -> dict:
        request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def put(self, url: str, key: str, value: str, timeout: float = 5.0) -> None:
        b64 = base64.b64encode
        self.call(url, "/v3/kv/put", {"key": b64(key.encode()).decode(),
                                      "value": b64(value.encode()).decode()}, timeout)

    def wait(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.put(self.clients[0], "ready", "1")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def leader(self) -> int:
        for i, url in enumerate(self.clients):
            status = self.call(url, "/v3/maintenance/status", {})
            if status["leader"] == status["header"]["member_id"]:
                return i
        raise RuntimeError("no leader")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def etcd(root: Path, turns: int) -> tuple[str, float, str] | None:
    if shutil.which("etcd") is None and not Path("/usr/bin/etcd").exists():
        print("etcd x3            (not installed: apt-get install etcd-server)")
        return None
    cluster = Etcd(root, 3)
    try:
        cluster.wait()
        turn = json.dumps([{"role": "user", "content": USER},
                           {"role": "assistant", "content": ANSWER}])
        times = []
        for n in range(turns):
            start = time.perf_counter()
            cluster.put(cluster.clients[n % 3], f"/conv/bench/c1/{n:08d}", turn)
            times.append(time.perf_counter() - start)
        ram = _pss_mb([p.pid for p in cluster.procs])
        leader = cluster.leader()
        cluster.procs[leader].kill()
        other = cluster.clients[(leader + 1) % 3]
        start = time.perf_counter()
        while True:
            try:  # short tries: a put waiting for a leader would hide when one is there
                cluster.put(other, "/after-failover", "1", timeout=0.2)
                break
            except OSError:
                time.sleep(0.05)
        failover = (f"{(time.perf_counter() - start) * 1000:.0f} ms after the leader's "
                    "SIGKILL until a write commits (election included)")
        return _row("etcd x3", times, ram, failover)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    print(f"{args.turns} turns of {len(USER) + len(ANSWER)} characters, written durably")
    print(f"{'engine':18s} {'p50 ms':>8s} {'p90 ms':>8s} {'RAM MB':>9s}   failover")
    rows = []
    runs = [lambda root: asyncio.run(sqlite(root, args.turns)),
            lambda root: asyncio.run(postgres(root, args.turns, False)),
            lambda root: asyncio.run(postgres(root, args.turns, True)),
            lambda root: etcd(root, args.turns)]
    for run in runs:
        with tempfile.TemporaryDirectory(prefix="pichat-ha-") as tmp:
            row = run(Path(tmp))
        if row is not None:
            rows.append(row)
            print(row[2], flush=True)
    base = rows[0][1]
    print("\nwrite p50 as a multiple of SQLite's: "
          + ", ".join(f"{name} {p50 / base:.1f}x" for name, p50, _ in rows[1:]))


if __name__ == "__main__":
    main()
