"""Joining in the fault lab's namespaces: Pis that hold nothing but a token join over the
lab's bridge, and everything the join flow promises is checked across real hosts.

- `pichat invite` on the router's keys; `pichat worker --join TOKEN` on two hosts (a
  two-use token): each makes its own key pair, is admitted, registers.
- The same token a third time, a forged one and an expired one: refused, with the reason.
- A client joins with a client token; `pichat status` then needs no --router.
- No file on a joined host holds the router's secret key or another host's secret.
- `pichat keys revoke w1` under a stream of requests: w1 is disconnected (the time is
  measured from the revocation by a watcher on the client host) and stays out while it
  keeps trying; w2 keeps serving; no request is lost.
- The router moves to another address: w2 follows it over mDNS and keeps the new address
  in its router.json; the client's `pichat status`, with no --router, finds it too.

Run by tests/test_faultlab.py; needs root. Returns what it saw, for the test to check."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402

from pichat.invites import parse  # noqa: E402
from pichat.security import keygen  # noqa: E402

MOVED_IP = f"{lab.SUBNET}.2"
WATCH = """
import asyncio, json, sys, time
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.invites import revoke
from pichat.security import resolve_keys
from pathlib import Path

router, client_keys, router_keys = sys.argv[1:4]
async def main():
    config = ClientConfig(router=router, keys=resolve_keys(client_keys))
    async with Client(config) as c:
        async def names():
            return {w["name"] for w in (await c.status())["workers"]}
        while not {"w1", "w2"} <= await names():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # requests are running on both
        start = time.monotonic()
        revoke(Path(router_keys), "w1")
        while "w1" in await names():
            await asyncio.sleep(0.02)
        gone = time.monotonic() - start
        print(json.dumps({"revoke_s": gone}), flush=True)
        seen_again, w2_stayed = False, True
        end = time.monotonic() + 8.0  # w1 keeps trying meanwhile
        while time.monotonic() < end:
            now = await names()
            seen_again |= "w1" in now
            w2_stayed &= "w2" in now
            await asyncio.sleep(0.1)
        print(json.dumps({"w1_back": seen_again, "w2_stayed": w2_stayed}), flush=True)
asyncio.run(main())
"""


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="pichat-join-"))
    net = lab.Network()
    seen: dict = {}
    procs: list[subprocess.Popen] = []
    try:
        net.up()
        router_keys = work / "router-keys"
        keygen(router_keys)
        secrets = {p.name: p.read_bytes().split(b"secret-key = ")[1].split(b'"')[1]
                   for p in router_keys.glob("*.key_secret")}

        def pichat(host: str, *args: str) -> subprocess.CompletedProcess:
            return lab.sh("ip", "netns", "exec", net.ns(host), sys.executable, "-m", "pichat",
                          *args, check=False)

        def router(ip: str):
            return net.spawn("router", [
                "-m", "pichat", "router", "--clients-bind", f"tcp://{ip}:5555",
                "--workers-bind", f"tcp://{ip}:5556", "--join-bind", f"tcp://{ip}:5557",
                "--http", "off", "--keys", str(router_keys)], work / "router.log")

        def invite(*args: str, address: str = lab.ROUTER_IP) -> str:
            made = pichat("router", "invite", "--keys", str(router_keys), "--address",
                          f"tcp://{address}:5557", *args)
            assert made.returncode == 0, made.stderr
            return made.stdout.strip()

        procs.append(router(lab.ROUTER_IP))
        workers_token = invite("--uses", "2")
        client_token = invite("--role", "client")
        short_token = invite("--ttl", "1")
        short_made = time.time()

        def worker(name: str) -> subprocess.Popen:
            proc = net.spawn(name, ["-m", "pichat", "worker", "--name", name, "--join",
                                    workers_token, "--keys", str(work / f"{name}-keys"),
                                    "--heartbeat", "0.5", *lab.SIM], work / f"{name}.log")
            procs.append(proc)
            return proc

        worker("w1")
        worker("w2")
        joined = pichat("client", "join", client_token, "--keys", str(work / "client-keys"),
                        "--name", "laptop")
        seen["client_joined"] = joined.returncode == 0
        client_keys = work / "client-keys"

        def listed(*extra: str) -> set[str]:
            out = pichat("client", "status", "--json", "--keys", str(client_keys), *extra)
            try:
                return {w["name"] for w in json.loads(out.stdout)["workers"]}
            except (ValueError, KeyError):
                return set()

        seen["both_registered"] = lab.until(lambda: {"w1", "w2"} <= listed(), 90)

        # Refusals: used up, forged, expired.
        used = pichat("w3", "join", workers_token, "--keys", str(work / "w3-keys"))
        seen["used_refused"] = (used.returncode, used.stderr.strip())
        forged = replace(parse(invite()), secret="guessed").token()
        bad = pichat("w3", "join", forged, "--keys", str(work / "w3-keys"))
        seen["forged_refused"] = (bad.returncode, bad.stderr.strip())
        lab.until(lambda: time.time() > short_made + 1.5, 5)
        late = pichat("w3", "join", short_token, "--keys", str(work / "w3-keys"))
        seen["expired_refused"] = (late.returncode, late.stderr.strip())
        seen["w3_admitted"] = (router_keys / "workers" / "w3.key").exists()

        # What the joined hosts hold: their own pair, the router's public key and address.
        seen["held"] = {}
        for host in ("w1-keys", "w2-keys", "client-keys"):
            files = sorted(p.name for p in (work / host).iterdir())
            leaked = [p.name for p in (work / host).iterdir()
                      if any(s in p.read_bytes() for s in secrets.values())]
            seen["held"][host] = {"files": files, "leaked": leaked}

        # Revocation under load: a stream of requests from the client host.
        load = net.spawn("client", [str(lab.LOAD), "--router", f"tcp://{lab.ROUTER_IP}:5555",
                                    "--keys", str(client_keys), "--workers", "w1,w2",
                                    "--duration", "14", "--concurrency", "6",
                                    "--out", str(work / "load.json")], work / "load.log")
        procs.append(load)
        watch = net.spawn("client", ["-c", WATCH, f"tcp://{lab.ROUTER_IP}:5555",
                                     str(client_keys), str(router_keys)], work / "watch.log")
        procs.append(watch)
        watch.wait(60)
        for line in (work / "watch.log").read_text().splitlines():
            if line.startswith("{"):
                seen.update(json.loads(line))
        seen["w1_tried_again"] = (work / "w1.log").read_text().count("READY sent") >= 2
        load.wait(60)
        seen["load"] = json.loads((work / "load.json").read_text())["counts"]

        # The router moves (a DHCP renewal): the worker and the client find it again.
        procs[0].terminate()
        procs[0].wait(20)
        net.move("router", MOVED_IP)
        procs.append(router(MOVED_IP))
        seen["w2_refound"] = lab.until(lambda: "w2" in listed("--router",
                                                         f"tcp://{MOVED_IP}:5555"), 90)
        kept = json.loads((work / "w2-keys" / "router.json").read_text())
        seen["w2_kept"] = kept.get("workers")
        found = pichat("client", "status", "--json", "--keys", str(client_keys))
        seen["client_refound"] = found.returncode == 0 and "w2" in found.stdout
        seen["client_told"] = found.stderr.strip()
        seen["client_kept"] = json.loads((client_keys / "router.json").read_text())
        return seen
    finally:
        seen["logs"] = lab.tear_down(procs, net, work)


if __name__ == "__main__":
    result = run()
    print(json.dumps({k: v for k, v in result.items() if k != "logs"}, indent=1))
