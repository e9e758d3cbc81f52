"""Discovery in the fault lab's namespaces (multicast stays on the lab's own bridge): a
worker that holds only its own key pair and the router's public key, with no router
address, finds the router over mDNS; a rogue announcer with another key is ignored; the
router moves to another address and the worker finds it again.

Run by tests/test_faultlab.py; needs root. Returns what it saw, for the test to check."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402

from pichat.security import keygen  # noqa: E402

MOVED_IP = f"{lab.SUBNET}.2"
ROGUE = """
import asyncio, sys
from pichat.discovery import Announcer
async def main():
    a = Announcer("0" * 40, {"workers": 5556, "clients": 5555}, name="rogue")
    await a.start()
    print("announcing", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="pichat-disco-"))
    net = lab.Network()
    seen: dict = {}
    procs = []
    try:
        net.up()
        keys = work / "router-keys"
        keygen(keys)
        pi = work / "pi-keys"  # a joined Pi: its own pair and the router's public key only
        pi.mkdir()
        for name in ("worker.key", "worker.key_secret", "router.key"):
            shutil.copy(keys / name, pi / name)

        def router(ip: str):
            return net.spawn("router", ["-m", "pichat", "router", "--clients-bind",
                                        f"tcp://{ip}:5555", "--workers-bind",
                                        f"tcp://{ip}:5556", "--http", "off", "--keys",
                                        str(keys), "--join-bind", "off"], work / "router.log")

        def listed(ip: str) -> set[str]:
            out = lab.sh("ip", "netns", "exec", net.ns("client"), sys.executable, "-m",
                          "pichat", "status", "--json", "--router", f"tcp://{ip}:5555",
                          "--keys", str(keys), check=False)
            try:
                import json

                return {w["name"] for w in json.loads(out.stdout)["workers"]}
            except (ValueError, KeyError):
                return set()

        rogue = net.spawn("attacker", ["-c", ROGUE], work / "rogue.log")
        procs.append(rogue)
        lab.until(lambda: "announcing" in (work / "rogue.log").read_text())
        first = router(lab.ROUTER_IP)
        procs.append(first)
        worker = net.spawn("w1", ["-m", "pichat", "worker", "--name", "w1", "--keys", str(pi),
                                  "--heartbeat", "0.5", *lab.SIM], work / "w1.log")
        procs.append(worker)
        seen["found"] = lab.until(lambda: "w1" in listed(lab.ROUTER_IP), 60)
        log = (work / "w1.log").read_text()
        seen["rogue_ignored"] = "ignoring a pichat router announced as rogue" in log
        seen["found_at"] = f"tcp://{lab.ROUTER_IP}:5556" in log
        # The router moves: its host gets another address (a DHCP renewal).
        first.terminate()
        first.wait(20)
        net.move("router", MOVED_IP)
        procs.append(router(MOVED_IP))
        seen["refound"] = lab.until(lambda: "w1" in listed(MOVED_IP), 90)
        seen["refound_at"] = f"tcp://{MOVED_IP}:5556" in (work / "w1.log").read_text()
        return seen
    finally:
        seen["logs"] = lab.tear_down(procs, net, work)


if __name__ == "__main__":
    result = run()
    print({k: v for k, v in result.items() if k != "logs"})
