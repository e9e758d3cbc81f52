"""Helpers shared by the benchmarks: a local cluster (on ports the router picks), percentiles."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pichat.client import Client
from pichat.cluster import ClusterConfig, LocalCluster


@asynccontextmanager
async def local_cluster(**kwargs) -> AsyncIterator[Client]:
    """A router and workers as real processes on loopback; yields a connected client."""
    async with cluster_and_client(**kwargs) as (_, client):
        yield client


@asynccontextmanager
async def cluster_and_client(**kwargs) -> AsyncIterator[tuple[LocalCluster, Client]]:
    """`local_cluster`, with the cluster (its processes) too."""
    config = ClusterConfig(**{"clients_bind": "tcp://127.0.0.1:0",
                              "workers_bind": "tcp://127.0.0.1:0", "http": "off",
                              "log_level": "warning", **kwargs})
    cluster = LocalCluster(config)
    await asyncio.to_thread(cluster.start)
    try:
        async with Client(cluster.client_config(silence_timeout=60)) as client:
            await cluster.wait_ready(client)
            yield cluster, client
    finally:
        cluster.stop()


def rss_mb(pid: int) -> float:
    """A process's resident memory, MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f}"
