"""A fault lab of real hosts on one machine: the router and three workers each in their own
network namespace (own address, own interface) on one bridge, a load of concurrent
streaming chat requests from a fifth "host", and faults injected while it runs: crashes,
stops, cut links, packet loss, a router restart, a rolling restart of every worker (with
conversations: how many later turns found their history warm), and hostile peers (an
admitted client and an admitted worker attacking the router from a sixth host,
tests/faultlab/attack.py).
Every link is secured with CurveZMQ keys made for the run.

For every scenario the lab reports: requests sent, completed, failed with a clear error,
lost (no answer and no error: must be 0), answers with duplicated or missing tokens
(checked against the deterministic answer of the simulated model: must be 0), the time
from the fault to the router noticing it, and the router's resident memory (before the
fault, at its highest, at the end) and its event loop's worst lag.

Needs root (namespaces, veth, iptables). Run it: `make fault-lab` (or
`python tests/faultlab/lab.py`); tests/test_faultlab.py runs it in `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pichat.security import keygen  # noqa: E402

LOAD = Path(__file__).with_name("load.py")
ATTACK = Path(__file__).with_name("attack.py")
SUBNET = "10.77.0"
ROUTER_IP = f"{SUBNET}.1"
CLIENT_IP = f"{SUBNET}.100"
ATTACKER_IP = f"{SUBNET}.66"
WORKERS = {"w1": f"{SUBNET}.11", "w2": f"{SUBNET}.12", "w3": f"{SUBNET}.13"}
SIM = ["--backend", "sim", "--sim-gen-tps", "20", "--sim-reply-tokens", "40", "--slots", "2",
       "--chunk-tokens", "4"]


# Discovery (mDNS) on for the lab's hosts: their multicast stays on the lab's bridge (the
# test suite switches it off for everything else).
ENV = {**os.environ, "PICHAT_DISCOVERY": "true"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, env=ENV)


def until(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` (a check across hosts: no event reaches us) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def tear_down(procs: list[subprocess.Popen], net: Network, work: Path) -> str:
    """Kill what still runs, take the network down and delete `work`; the tail of every
    log in `work`, for a failing test to show."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logs = "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}"
                     for p in sorted(work.glob("*.log")))
    net.down()
    shutil.rmtree(work, ignore_errors=True)
    return logs


def available() -> str | None:
    """Why the lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables"):
        if sh("which", tool, check=False).returncode:
            return f"needs {tool}"
    probe = f"pichat-probe-{os.getpid()}"
    if sh("ip", "netns", "add", probe, check=False).returncode:
        return "cannot create network namespaces here"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Network:
    """Namespaces on a bridge: one per host, the bridge in its own namespace (a host
    firewall, e.g. dockerd's FORWARD policy, does not interfere)."""

    def __init__(self) -> None:
        self.tag = f"pl{os.getpid() % 100000}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts = {"router": ROUTER_IP, "client": CLIENT_IP, "attacker": ATTACKER_IP,
                      **WORKERS}

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def port(self, host: str) -> str:
        return f"{self.tag}{host[:2]}{list(self.hosts).index(host)}b"

    def up(self) -> None:
        self.down()
        sh("ip", "netns", "add", self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for host, ip in self.hosts.items():
            ns, port = self.ns(host), self.port(host)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
               "netns", self.bridge_ns)
            sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for host in self.hosts:
            sh("ip", "netns", "del", self.ns(host), check=False)
        sh("ip", "netns", "del", self.bridge_ns, check=False)

    def move(self, host: str, ip: str) -> None:
        """Give `host` another address (a DHCP renewal)."""
        sh("ip", "-n", self.ns(host), "addr", "flush", "dev", "eth0")
        sh("ip", "-n", self.ns(host), "addr", "add", f"{ip}/24", "dev", "eth0")

    def cut(self, host: str, cut: bool) -> None:
        sh("ip", "-n", self.bridge_ns, "link", "set", self.port(host), "down" if cut else "up")

    def loss(self, host: str, probability: float | None) -> None:
        """Drop this share of the host's packets, both ways (None: stop)."""
        ns = self.ns(host)
        if probability is None:
            sh("ip", "netns", "exec", ns, "iptables", "-F")
            return
        for chain in ("INPUT", "OUTPUT"):
            sh("ip", "netns", "exec", ns, "iptables", "-A", chain, "-m", "statistic", "--mode",
               "random", "--probability", str(probability), "-j", "DROP")

    def spawn(self, host: str, argv: list[str], log: Path) -> subprocess.Popen:
        env = {**ENV, "PYTHONUNBUFFERED": "1", "PICHAT_KEYS": "off", "PYTHONPATH": str(ROOT)}
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(["ip", "netns", "exec", self.ns(host), sys.executable,
                                     *argv], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT)


@dataclass
class Result:
    scenario: str
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    corrupted: int = 0
    """Answers with duplicated or missing tokens."""
    failovers: int = 0
    detect_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    rss_mb: tuple[float, float, float] | None = None
    """The router's resident memory: before the fault, highest, at the end."""
    lag_ms: float | None = None
    """The router's event loop: the worst lateness of a 100 ms timer."""
    attack: dict = field(default_factory=dict)
    """What the attacker sent and was told (hostile scenarios)."""
    later_turns: int = 0
    warm_turns: int = 0
    """Conversations' turns after their first, and those that found their history cached
    (the rolling restart)."""

    @property
    def warm_share(self) -> float | None:
        return self.warm_turns / self.later_turns if self.later_turns else None

    def row(self) -> str:
        detect = f"{self.detect_s:.1f}" if self.detect_s is not None else "-"
        memory = "{:.0f}/{:.0f}/{:.0f}".format(*self.rss_mb) if self.rss_mb else "-"
        lag = f"{self.lag_ms:.0f}" if self.lag_ms is not None else "-"
        warm = (f"   warm {self.warm_turns}/{self.later_turns} turns"
                if self.later_turns else "")
        return (f"{self.scenario:<22}{self.sent:>6}{self.completed:>11}{self.failed:>8}"
                f"{self.lost:>6}{self.corrupted:>10}{self.failovers:>11}{detect:>10}"
                f"{memory:>16}{lag:>9}{warm}")


HEADER = (f"{'scenario':<22}{'sent':>6}{'completed':>11}{'failed':>8}{'lost':>6}"
          f"{'dup/miss':>10}{'failovers':>11}{'detect s':>10}{'router MB':>16}"
          f"{'lag ms':>9}")


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.net = Network()
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.frozen_at: float | None = None
        self.keys = workdir / "keys"
        keygen(self.keys, workers=("evil",), clients=("evil",))
        self.attack_report = workdir / "attack.json"

    def __enter__(self) -> Lab:
        self.net.up()
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.net.down()

    def start_router(self) -> None:
        self.procs["router"] = self.net.spawn("router", [
            "-m", "pichat", "router", "--clients-bind", f"tcp://{ROUTER_IP}:5555",
            "--workers-bind", f"tcp://{ROUTER_IP}:5556", "--http", f"{ROUTER_IP}:8080",
            "--keys", str(self.keys), "--no-discovery"], self.workdir / "router.log")

    def start_worker(self, name: str) -> None:
        self.procs[name] = self.net.spawn(name, [
            "-m", "pichat", "worker", "--router", f"tcp://{ROUTER_IP}:5556", "--name", name,
            "--keys", str(self.keys), "--state-dir", str(self.workdir / f"{name}-kv"),
            "--no-discovery", *SIM],
            self.workdir / f"{name}.log")

    def listed(self) -> set[str]:
        return {w["name"] for w in self.status().get("workers", [])}

    def signal(self, name: str, signum: int) -> None:
        self.procs[name].send_signal(signum)

    def status(self) -> dict:
        """The router's status, asked from the client host ({} if it does not answer)."""
        out = sh("ip", "netns", "exec", self.net.ns("client"), sys.executable, "-m", "pichat",
                 "status", "--json", "--router", f"tcp://{ROUTER_IP}:5555", "--keys",
                 str(self.keys), check=False)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {}

    def streaming(self, worker: str) -> int:
        """Answers the router sees `worker` streaming."""
        return sum(w.get("streaming", 0) for w in self.status().get("workers", [])
                   if w["name"] == worker)

    def freeze_mid_answer(self, worker: str) -> None:
        """Stop `worker` (SIGSTOP) at a moment the router sees it streaming an answer, so
        that a fault injected now always interrupts one: freeze, ask, thaw and retry."""
        for _ in range(50):
            self.signal(worker, signal.SIGSTOP)
            self.frozen_at = time.time()
            if self.streaming(worker) >= 1:
                return
            self.signal(worker, signal.SIGCONT)
            time.sleep(0.2)
        raise RuntimeError(f"{worker} was never seen streaming")

    def run(self, scenario: str, fault, *, duration: float = 14.0, fault_at: float = 4.0,
            watch: str | None = "w1", conversations: bool = False) -> Result:
        """Start everything, run the load for `duration` s, call `fault(lab)` at
        `fault_at` s (it returns a function that ends the fault, or None), and collect."""
        self.start_router()
        for name in WORKERS:
            self.start_worker(name)
        out = self.workdir / "result.json"
        load = self.net.spawn("client", [
            str(LOAD), "--router", f"tcp://{ROUTER_IP}:5555", "--duration", str(duration),
            "--out", str(out), "--workers", ",".join(WORKERS), "--keys", str(self.keys),
            *(["--conversations"] if conversations else [])],
            self.workdir / "load.log")
        ready = self.workdir / "result.json.ready"
        deadline = time.monotonic() + 60
        while not ready.exists():
            if load.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the load did not start: {self.logs()}")
            time.sleep(0.1)
        time.sleep(fault_at)  # the load is under way
        injected = time.time()
        self.frozen_at = None
        end = fault(self)
        injected = self.frozen_at or injected  # a frozen worker went silent then
        if end is not None:
            time.sleep(6.0)
            end(self)
        load.wait(duration + 120)
        final = self.status()  # after the load and any attack: what the router kept
        data = json.loads(out.read_text())
        result = Result(scenario, **data["counts"])
        timeline = data["timeline"]
        if watch is not None:  # the router noticed: the worker left its list
            gone = [t for t, names, *_ in timeline if t > injected and watch not in names]
            result.detect_s = round(gone[0] - injected, 2) if gone else None
        elif scenario == "router restart":  # back: a new router lists every worker again
            back = [t for t, names, started, *_ in timeline
                    if t > injected and len(names) == 3 and started and started >= injected - 1]
            result.detect_s = round(back[0] - injected, 2) if back else None
        samples = [(t, rss, lag) for t, _, _, rss, lag in timeline if rss is not None]
        before = [rss for t, rss, _ in samples if t <= injected]
        end = final.get("router", {}).get("memory", {}).get("rss_mb")
        if before and end and scenario != "router restart":  # a new router: another process
            result.rss_mb = (before[-1], max(rss for _, rss, _ in samples), end)
        if samples:  # the worst of the run (the router's last minute: the whole run)
            result.lag_ms = max(lag for _, _, lag in samples)
        if self.attack_report.exists():
            result.attack = json.loads(self.attack_report.read_text())
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.procs.clear()
        return result

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}"
                         for p in sorted(self.workdir.glob("*.log")))


def _kill(lab: Lab):
    lab.freeze_mid_answer("w1")
    lab.signal("w1", signal.SIGKILL)


def _stop(lab: Lab):
    lab.freeze_mid_answer("w1")  # and it stays stopped
    return lambda lab: lab.signal("w1", signal.SIGCONT)


def _cut(lab: Lab):
    lab.freeze_mid_answer("w1")
    lab.net.cut("w1", True)
    lab.signal("w1", signal.SIGCONT)
    return lambda lab: lab.net.cut("w1", False)


def _loss(lab: Lab):
    lab.net.loss("w1", 0.05)
    return lambda lab: lab.net.loss("w1", None)


def _attack(role: str):
    def attack(lab: Lab):
        endpoint = f"tcp://{ROUTER_IP}:{5555 if role == 'client' else 5556}"
        proc = lab.net.spawn("attacker", [
            str(ATTACK), role, "--router", endpoint, "--http", f"http://{ROUTER_IP}:8080",
            "--keys", str(lab.keys), "--out", str(lab.attack_report)],
            lab.workdir / f"attack-{role}.log")
        if proc.wait(120) != 0:
            raise RuntimeError(f"the {role} attack failed: {lab.logs()}")
    return attack


def _rolling(lab: Lab):
    """Every worker drained (SIGTERM) and started again, one after another, while the
    conversations go on: an upgrade."""
    for name in WORKERS:
        lab.signal(name, signal.SIGTERM)
        if lab.procs[name].wait(60) != 0:
            raise RuntimeError(f"{name} did not drain cleanly: {lab.logs()}")
        lab.start_worker(name)
        deadline = time.monotonic() + 60
        while name not in lab.listed():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come back: {lab.logs()}")
            time.sleep(0.2)


def _router(lab: Lab):
    lab.signal("router", signal.SIGKILL)
    lab.procs["router"].wait()
    time.sleep(1.0)
    lab.start_router()


SCENARIOS = {
    "worker SIGKILL": (_kill, "w1"),
    "worker SIGSTOP/SIGCONT": (_stop, "w1"),
    "link cut and restored": (_cut, "w1"),
    "5% packet loss": (_loss, None),
    "router restart": (_router, None),
    "rolling restart": (_rolling, None),
    "hostile client": (_attack("client"), None),
    "hostile worker": (_attack("worker"), None),
}
OPTIONS = {"rolling restart": {"conversations": True, "duration": 40.0, "fault_at": 6.0}}
"""Scenarios that run otherwise than the default."""


def run_all(names: list[str] | None = None) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="pichat-faultlab-") as tmp:
        for name in names or list(SCENARIOS):
            fault, watch = SCENARIOS[name]
            workdir = Path(tmp) / name.replace(" ", "_").replace("/", "_")
            workdir.mkdir()
            with Lab(workdir) as lab:
                try:
                    results.append(lab.run(name, fault, watch=watch,
                                           **OPTIONS.get(name, {})))
                except Exception:
                    print(lab.logs(), file=sys.stderr)
                    raise
    return results


if __name__ == "__main__":
    reason = available()
    if reason:
        sys.exit(f"fault lab: {reason}")
    chosen = sys.argv[1:] or None
    print("pichat fault lab: router + 3 workers (sim, 2 slots) as hosts in network namespaces; "
          "12 concurrent streaming clients; heartbeat 1 s x 3")
    print(HEADER)
    for result in run_all(chosen):
        print(result.row(), flush=True)
        for error, n in sorted(result.errors.items(), key=lambda e: -e[1])[:3]:
            print(f"    {n} x {error}")
