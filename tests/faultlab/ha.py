"""Two routers in the fault lab, one floating HTTP address (keepalived's VRRP, from
Debian), conversations in etcd on three hosts, and a router host lost under load.

Hosts (network namespaces on one bridge): r1 and r2 each run `pichat router` (one keys
directory, `--db etcd://...`), an etcd member and keepalived; w1 runs the third etcd member
(the witness) and a worker; w2 and w3 run workers. Every worker registers with both
routers. The client host runs 12 conversations: 6 through `pichat`'s own client given both
routers (tests/faultlab/load.py) and 6 through the OpenAI API at the floating address
(tests/faultlab/httpload.py).

keepalived holds the address on r1 first. Its check on each router host is the router's
/health and the local etcd member's /health (a member cut off from the majority has no
leader): a router host that loses its router, or its link, gives the address up, and
`nopreempt` keeps a host that comes back from taking it again.

Faults: r1's router SIGKILLed (then restarted: it must rejoin without taking the address
or anyone's stream), and r1's link cut (then restored). For each: the counts of both
loads, the time until the address answers on r2, and until a new HTTP request is
answered.

Run by tests/test_faultlab.py, or alone (`python tests/faultlab/ha.py`; root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402

from pichat.security import keygen  # noqa: E402

VIP = f"{lab.SUBNET}.5"
HOSTS = {"r1": f"{lab.SUBNET}.1", "r2": f"{lab.SUBNET}.2", "client": lab.CLIENT_IP,
         **lab.WORKERS}
ETCD_HOSTS = ("r1", "r2", "w1")
HTTPLOAD = Path(__file__).with_name("httpload.py")
LEAD = 4.0
"""Seconds the loads run (every client answered once) before the fault."""
AFTER = 6.0
"""Seconds they run on once the fault is over (the address moved and r1 back, or the
link mended), then are told to stop."""
LONGEST = 120.0
"""A load's own limit, should it never be told."""

KEEPALIVED = """
global_defs {{
    router_id {host}
    script_user root
    enable_script_security
    vrrp_version 3
}}
vrrp_script pichat_router {{
    script "/usr/bin/curl -sf -m 0.8 -o /dev/null http://127.0.0.1:8080{check}"
    interval 1
    timeout 1
    fall 2
    rise {rise}
}}
vrrp_script etcd_quorum {{
    script "/usr/bin/curl -sf -m 0.8 -o /dev/null http://{ip}:2379/health"
    interval 1
    timeout 1
    fall 4
    rise 2
}}
vrrp_instance pichat {{
    state BACKUP
    interface eth0
    virtual_router_id 77
    priority {priority}
    advert_int {advert}
    nopreempt
    garp_master_refresh 1
    virtual_ipaddress {{
        {vip}/24
    }}
    track_script {{
        pichat_router
        etcd_quorum
    }}
}}
"""
"""The router's check fails fast (two seconds); the etcd member's slowly (four: an
election after a member's death makes every member unhealthy for a second or so). With the
election (/health/floating) a router that comes to hold the key passes at once (rise 1),
and adverts every 0.2 s make a backup leaving its fault state take the address in 0.7 s
rather than 1.8: the lease's 2 s come on top of the failover."""


class HaLab:
    def __init__(self, work: Path, elected: bool = False) -> None:
        """`elected`: keepalived's router check asks /health/floating (only the router
        holding the election's key in etcd passes: one holder even when the routers
        cannot hear each other), else /health."""
        self.work = work
        self.elected = elected
        self.net = lab.Network()
        self.net.hosts = dict(HOSTS)
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys = work / "keys"
        keygen(self.keys)
        for host in ("r1", "r2"):  # each router Pi its own copy (kept alike through etcd)
            shutil.copytree(self.keys, work / f"keys-{host}")
        self.db = "etcd://" + ",".join(f"{HOSTS[h]}:2379" for h in ETCD_HOSTS) + "/pichat/"

    def run(self, host: str, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.net.ns(host), *argv],
                                    stdout=out, stderr=subprocess.STDOUT, env={
                                        **lab.ENV, "PYTHONUNBUFFERED": "1",
                                        "PICHAT_KEYS": "off", "PYTHONPATH": str(lab.ROOT)},
                                    cwd=lab.ROOT)
        self.procs[name] = proc
        return proc

    def etcd(self, host: str) -> None:
        ip = HOSTS[host]
        cluster = ",".join(f"e{h}=http://{HOSTS[h]}:2380" for h in ETCD_HOSTS)
        data = self.work / f"etcd-{host}"
        self.run(host, f"etcd-{host}", [
            "etcd", "--name", f"e{host}", "--data-dir", str(data),
            "--listen-client-urls", f"http://{ip}:2379,http://127.0.0.1:2379",
            "--advertise-client-urls", f"http://{ip}:2379",
            "--listen-peer-urls", f"http://{ip}:2380",
            "--initial-advertise-peer-urls", f"http://{ip}:2380",
            "--initial-cluster", cluster, "--initial-cluster-token", self.net.tag,
            "--initial-cluster-state", "new", "--unsafe-no-fsync",
            "--heartbeat-interval", "100", "--election-timeout", "1000", "--pre-vote",
            "--auto-compaction-retention", "1",
            "--log-level", "error"])

    def router(self, host: str, name: str | None = None) -> None:
        ip = HOSTS[host]
        ready = self.work / f"{host}.ready"
        ready.unlink(missing_ok=True)
        self.run(host, name or f"router-{host}", [
            sys.executable, "-m", "pichat", "router", "--clients-bind", f"tcp://{ip}:5555",
            "--workers-bind", f"tcp://{ip}:5556", "--http", "0.0.0.0:8080",
            "--keys", str(self.work / f"keys-{host}"), "--no-discovery", "--heartbeat", "0.5",
            "--db", self.db, "--floating-address", VIP, "--ready-file", str(ready)])
        if not lab.until(ready.exists, 60):
            raise RuntimeError(f"the router on {host} did not start")

    def keepalived(self, host: str, priority: int) -> None:
        conf = self.work / f"keepalived-{host}.conf"
        conf.write_text(KEEPALIVED.format(
            host=host, ip=HOSTS[host], priority=priority, vip=VIP,
            check="/health/floating" if self.elected else "/health",
            rise=1 if self.elected else 2, advert=0.2 if self.elected else 0.5))
        self.run(host, f"keepalived-{host}", [
            "keepalived", "--dont-fork", "--log-console", "--vrrp", "-f", str(conf),
            "-p", str(self.work / f"keepalived-{host}.pid"),
            "-r", str(self.work / f"vrrp-{host}.pid")])

    def holders(self) -> list[str]:
        """The router hosts holding the floating address now."""
        return [host for host in ("r1", "r2") if f" {VIP}/" in lab.sh(
            "ip", "-n", self.net.ns(host), "-o", "addr", "show", "dev", "eth0",
            check=False).stdout]

    def holder(self) -> str | None:
        """The router host holding the floating address now (the first, if two do)."""
        return next(iter(self.holders()), None)

    def vip_answers(self) -> bool:
        return lab.sh("ip", "netns", "exec", self.net.ns("client"), "curl", "-sf", "-m",
                      "0.3", f"http://{VIP}:8080/health", check=False).returncode == 0

    def start(self) -> None:
        self.net.up()
        for host in ETCD_HOSTS:
            self.etcd(host)
        for host in ("r1", "r2"):
            self.router(host)
        routers = ",".join(f"tcp://{HOSTS[h]}:5556" for h in ("r1", "r2"))
        for name in lab.WORKERS:
            self.run(name, name, [
                sys.executable, "-m", "pichat", "worker", "--router", routers,
                "--name", name, "--keys", str(self.keys), "--no-discovery",
                "--heartbeat", "0.5", "--state-dir", str(self.work / f"{name}-kv"),
                *lab.SIM])
        self.keepalived("r1", 100)
        if not lab.until(lambda: self.holder() == "r1", 30):
            raise RuntimeError("keepalived on r1 did not take the address")
        self.keepalived("r2", 100)

    @property
    def stop_file(self) -> Path:
        """Once it exists, every load ends (`stop_loads`)."""
        return self.work / "stop"

    def stop_loads(self) -> None:
        self.stop_file.touch()

    def loads(self, tag: str, order: tuple[str, str] = ("r1", "r2")
              ) -> tuple[subprocess.Popen, subprocess.Popen, Path, Path]:
        routers = ",".join(f"tcp://{HOSTS[h]}:5555" for h in order)
        zmq_out, http_out = self.work / f"zmq-{tag}.json", self.work / f"http-{tag}.json"
        z = self.run("client", f"zmq-{tag}", [
            sys.executable, str(lab.LOAD), "--router", routers, "--out", str(zmq_out),
            "--duration", str(LONGEST), "--stop-file", str(self.stop_file),
            "--concurrency", "6", "--conversations", "--keys", str(self.keys)])
        h = self.run("client", f"http-{tag}", [
            sys.executable, str(HTTPLOAD), "--url", f"http://{VIP}:8080", "--out",
            str(http_out), "--duration", str(LONGEST), "--stop-file", str(self.stop_file),
            "--concurrency", "6", "--api-key-file", str(self.keys / "api-keys")])
        return z, h, zmq_out, http_out

    @staticmethod
    def wait_ready(*outs: Path) -> None:
        """Until each load is under way (pichat's: every worker seen; HTTP: every client
        answered once)."""
        for out in outs:
            if not lab.until(Path(str(out) + ".ready").exists, 90):
                raise RuntimeError(f"the load writing {out.name} never got under way")

    def split(self, cut: bool) -> None:
        """Cut (or mend) the link between r1 and r2 only: each still reaches every other
        host, the workers and the third etcd member among them."""
        for here, there in (("r1", "r2"), ("r2", "r1")):
            ns, ip = self.net.ns(here), HOSTS[there]
            for chain, side in (("INPUT", "-s"), ("OUTPUT", "-d")):
                lab.sh("ip", "netns", "exec", ns, "iptables", "-A" if cut else "-D", chain,
                       side, ip, "-j", "DROP")

    def _etcd(self, host: str, call: str, body: dict) -> dict:
        """A call to `host`'s etcd member, from its host ({} if it does not answer)."""
        out = lab.sh("ip", "netns", "exec", self.net.ns(host), "curl", "-sf", "-m", "1",
                     "-X", "POST", "-d", json.dumps(body),
                     f"http://{HOSTS[host]}:2379/v3/{call}", check=False)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {}

    def etcd_leader(self) -> str | None:
        """The host whose etcd member leads (as w1's member says), None if none does."""
        leader = self._etcd("w1", "maintenance/status", {}).get("leader")
        ids = {self._etcd(h, "maintenance/status", {}).get("header", {}).get("member_id"): h
               for h in ETCD_HOSTS}
        return ids.get(leader) if leader else None

    def lead(self, host: str) -> None:
        """Make `host`'s etcd member the leader (etcd's own leadership transfer)."""
        target = self._etcd(host, "maintenance/status", {}).get("header", {}).get("member_id")
        for _ in range(20):
            leader = self.etcd_leader()
            if leader == host:
                return
            if leader is not None and target:
                self._etcd(leader, "maintenance/transfer-leadership", {"targetID": target})
            time.sleep(0.25)
        raise RuntimeError(f"etcd's leadership did not move to {host}")

    def stored_load(self, tag: str, order: tuple[str, str]) -> tuple[subprocess.Popen, Path]:
        routers = ",".join(f"tcp://{HOSTS[h]}:5555" for h in order)
        out = self.work / f"stored-{tag}.json"
        proc = self.run("client", f"stored-{tag}", [
            sys.executable, str(lab.LOAD), "--router", routers, "--out", str(out),
            "--duration", str(LONGEST), "--stop-file", str(self.stop_file),
            "--concurrency", "3", "--stored", "--keys", str(self.keys)])
        return proc, out

    def routers_seen(self) -> list[dict]:
        """`pichat status --router r1,r2` from the client host: each router's row."""
        routers = ",".join(f"tcp://{HOSTS[h]}:5555" for h in ("r1", "r2"))
        out = lab.sh("ip", "netns", "exec", self.net.ns("client"), sys.executable, "-m",
                     "pichat", "status", "--json", "--router", routers, "--keys",
                     str(self.keys), check=False)
        try:
            return json.loads(out.stdout).get("routers", [])
        except ValueError:
            return []

    def stop(self) -> str:
        return lab.tear_down(list(self.procs.values()), self.net, self.work)


def scenario(fault: str, elected: bool = False) -> dict:
    """One fault on r1 under load: what both loads saw, and the failover's times."""
    work = Path(tempfile.mkdtemp(prefix="pichat-ha-"))
    ha = HaLab(work, elected)
    seen: dict = {"fault": fault + (", elected" if elected else "")}
    try:
        ha.start()
        z, h, zmq_out, http_out = ha.loads(fault)
        ha.wait_ready(zmq_out, http_out)
        time.sleep(LEAD)  # the loads run: the fault comes amid them
        fault_at = time.time()
        r1_log = ha.work / "keepalived-r1.log"
        r1_log_before = len(r1_log.read_text())  # a FAULT at start-up must not count
        if fault == "router SIGKILL":
            ha.procs["router-r1"].kill()
        else:
            ha.net.cut("r1", True)
        lab.until(lambda: ha.holder() == "r2" and ha.vip_answers(), 30)
        seen["vip_s"] = time.time() - fault_at
        if fault == "router SIGKILL":
            ha.router("r1", "router-r1-again")  # rejoins while the load goes on
        else:  # cut long enough for r1 to find itself alone (its etcd check fails)
            if not lab.until(lambda: "etcd_quorum) failed" in r1_log.read_text()[r1_log_before:],
                             30):
                raise RuntimeError("r1, cut off, never found its etcd member alone")
            seen["r1_gave_up_s"] = time.time() - fault_at
            ha.net.cut("r1", False)
        rejoined_at = time.time()
        time.sleep(AFTER)  # r1 back, the loads go on
        ha.stop_loads()
        for proc in (z, h):
            proc.wait(timeout=150)
        seen["holder_after_rejoin"] = ha.holder()
        rows = ha.routers_seen()
        seen["status_holders"] = [r["endpoint"] for r in rows
                                  if (r.get("floating") or {}).get("held")]
        seen["failovers"] = {r["endpoint"]: ((r.get("floating") or {}).get("failovers"),
                                             (r.get("floating") or {}).get("last_failover"))
                             for r in rows}
        seen["zmq"] = json.loads(zmq_out.read_text())["counts"]
        http = json.loads(http_out.read_text())
        seen["http"] = http["counts"]
        seen["http_errors"] = http["errors"]
        # From the fault until a new request (a probe sent after it) is answered.
        after = [answered for sent, answered in http["probes"] if sent > fault_at]
        seen["answered_again_s"] = (min(after) - fault_at) if after else None
        seen["http_after_rejoin"] = sum(1 for start, _, _, ok in http["answers"]
                                        if start > rejoined_at and ok)
        seen["http_failures"] = [(round(t - fault_at, 2), what)
                                 for t, what in http["failures"]]
        return seen
    finally:
        _keep_logs(work, seen["fault"])
        seen["logs"] = ha.stop()


def _keep_logs(work: Path, fault: str) -> None:
    keep = os.environ.get("PICHAT_HA_LOGS")
    if keep:  # every log of the run, for a look afterwards
        shutil.copytree(work, Path(keep) / fault.replace(" ", "-").replace(",", ""),
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*-kv", "etcd-*", "keys", "keys-*"))


def split_scenario(leader: str, elected: bool = False) -> dict:
    """The link between the two routers cut under load while both reach the workers and
    the third etcd member (`leader`'s member leading etcd: r1's, so that r2's loses its
    leader, or w1's, which both still reach), then mended: what every load saw, who held
    the address."""
    work = Path(tempfile.mkdtemp(prefix="pichat-ha-"))
    ha = HaLab(work, elected)
    seen: dict = {"fault": f"routers split, etcd led from {leader}"
                  + (", elected" if elected else "")}
    try:
        ha.start()
        # r1 carries the HTTP load (it holds the address), r2 the pichat sessions; stored
        # conversations go through both.
        z, h, zmq_out, http_out = ha.loads("split", order=("r2", "r1"))
        s1, stored1 = ha.stored_load("r1", ("r1", "r2"))
        s2, stored2 = ha.stored_load("r2", ("r2", "r1"))
        ha.wait_ready(zmq_out, http_out, stored1, stored2)
        ha.lead(leader)
        time.sleep(LEAD)
        seen["leader_before"] = ha.etcd_leader()
        split_at = time.time()
        ha.split(True)
        holders: set[tuple[str, ...]] = set()
        while time.time() - split_at < 8:  # both routers' checks have had their say
            holders.add(tuple(h for h in ("r1", "r2") if h in ha.holders()))
            time.sleep(0.2)
        seen["holders_during_split"] = sorted(holders)
        seen["leader_during_split"] = ha.etcd_leader()
        ha.split(False)
        mended_at = time.time()
        one = lab.until(lambda: len(ha.holders()) == 1 and ha.etcd_leader() is not None
                        and ha.vip_answers(), 30)
        seen["converged_s"] = round(time.time() - mended_at, 2) if one else None
        time.sleep(AFTER)  # mended, the loads go on
        ha.stop_loads()
        for proc in (z, h, s1, s2):
            proc.wait(timeout=150)
        seen["holders_after"] = ha.holders()
        seen["workers_seen"] = {r["endpoint"]: r.get("workers") for r in ha.routers_seen()}
        seen["zmq"] = json.loads(zmq_out.read_text())["counts"]
        http = json.loads(http_out.read_text())
        seen["http"] = http["counts"]
        seen["http_errors"] = http["errors"]
        seen["stored"] = [json.loads(out.read_text())["counts"] for out in (stored1, stored2)]
        return seen
    finally:
        _keep_logs(work, seen["fault"])
        seen["logs"] = ha.stop()


SCENARIOS = ("router SIGKILL", "router host cut off")


def main() -> None:
    reason = lab.available()
    if reason or not shutil.which("keepalived") or not shutil.which("etcd"):
        sys.exit(f"the HA lab cannot run here: {reason or 'needs keepalived and etcd'}")
    for run in (*(lambda fault=fault: scenario(fault) for fault in SCENARIOS),
                *(lambda leader=leader: split_scenario(leader) for leader in ("r1", "w1"))):
        seen = run()
        seen.pop("logs")
        print(json.dumps(seen, indent=1))


if __name__ == "__main__":
    main()
