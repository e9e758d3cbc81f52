"""What the HA layout costs a stored turn: one router on SQLite (the default) vs two routers
on etcd x3 (three local members) with every worker registered with both, the same load
side by side in one run.

    8 conversations x 8 kept turns (`conversation=`), all at once; 2 simulated workers x 4
    slots (16 tokens at 400 tokens/s: the router, the store and the extra registration are
    what is measured, not a model). With two routers, half the conversations go through
    each.

Printed: wall, median and p90 turn time (sent to answer stored), the routers' RSS (sum)
and etcd's; ratios two routers / one. Run: .venv/bin/python bench/run.py ha
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from etcd import EtcdCluster  # noqa: E402

from common import ms, rss_mb  # noqa: E402
from conftest import Cluster  # noqa: E402
from pichat.client import Client  # noqa: E402
from pichat.config import ClientConfig  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402

CONVERSATIONS = 8
TURNS = 8
WORKER = ["--slots", "4", "--sim-reply-tokens", "16", "--sim-gen-tps", "400"]
GREEDY = Sampling(temperature=0.0, max_tokens=16)


async def _converse(endpoint: str, title: str, times: list[float]) -> None:
    async with Client(ClientConfig(router=endpoint)) as client:
        for turn in range(TURNS):
            start = time.perf_counter()
            await client.chat([ChatMessage("user", f"{title}: turn {turn}, tell me more.")],
                              sampling=GREEDY, conversation=title)
            times.append(time.perf_counter() - start)


async def _load(endpoints: list[str]) -> tuple[float, list[float]]:
    times: list[float] = []
    start = time.perf_counter()
    await asyncio.gather(*(_converse(endpoints[i % len(endpoints)], f"c{i}", times)
                           for i in range(CONVERSATIONS)))
    return time.perf_counter() - start, times


async def _one(work: Path) -> tuple[float, list[float], float]:
    router = Cluster(work)
    try:
        proc = router.router("--db", str(work / "conversations.db"))
        for i in range(2):
            router.worker(f"w{i}", *WORKER)
        await router.wait_workers(2)
        wall, times = await _load([router.client_endpoint])
        return wall, times, rss_mb(proc.popen.pid)
    finally:
        router.close()


async def _two(work: Path, etcd: EtcdCluster) -> tuple[float, list[float], float, float]:
    (work / "a").mkdir()
    (work / "b").mkdir()
    a, b = Cluster(work / "a"), Cluster(work / "b")
    db = etcd.url + "/bench/"
    try:
        procs = [a.router("--db", db), b.router("--db", db)]
        for i in range(2):
            a.worker(f"w{i}", *WORKER, also=b)
        await a.wait_workers(2)
        await b.wait_workers(2)
        wall, times = await _load([a.client_endpoint, b.client_endpoint])
        routers = sum(rss_mb(p.popen.pid) for p in procs)
        members = sum(rss_mb(p.pid) for p in etcd.procs if p is not None)
        return wall, times, routers, members
    finally:
        a.close()
        b.close()


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


async def main(argv: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="pichat-bench-ha-") as tmp:
        work = Path(tmp)
        etcd, why = EtcdCluster.start(3)
        if etcd is None:
            return [f"two routers need etcd: {why} (apt-get install etcd-server)"]
        try:
            (work / "one").mkdir()
            (work / "two").mkdir()
            one_wall, one_times, one_rss = await _one(work / "one")
            two_wall, two_times, two_rss, etcd_rss = await _two(work / "two", etcd)
        finally:
            etcd.stop()
    rows = [("one router, SQLite", one_wall, one_times, one_rss, 0.0),
            ("two routers, etcd x3", two_wall, two_times, two_rss, etcd_rss)]
    lines = [f"{CONVERSATIONS} conversations x {TURNS} kept turns, all at once, 2 sim workers "
             "x 4 slots", f"{'':22} {'wall':>7} {'median':>8} {'p90':>8} {'routers':>9} "
             f"{'etcd':>8}"]
    for name, wall, times, rss, members in rows:
        lines.append(f"{name:22} {wall:6.2f}s {ms(statistics.median(times)):>8} "
                     f"{ms(_p90(times)):>8} {rss:7.0f}MB {members:6.0f}MB")
    lines.append(f"two / one: wall {two_wall / one_wall:.2f}x, median turn "
                 f"{statistics.median(two_times) / statistics.median(one_times):.2f}x, p90 "
                 f"{_p90(two_times) / _p90(one_times):.2f}x; RAM "
                 f"{(two_rss + etcd_rss) / one_rss:.1f}x (routers and etcd members)")
    return lines


if __name__ == "__main__":
    for line in asyncio.run(main(sys.argv[1:])):
        print(line)
