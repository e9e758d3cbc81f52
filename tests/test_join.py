"""A new Pi joins with a token (pichat invite / pichat join), real processes: it makes
its own keys, the router admits them, and its worker then needs no --router; a used or
forged token is refused and logged; no secret but its own lands on the Pi."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import zmq.auth

from conftest import ROOT, Cluster
from pichat.invites import parse
from pichat.security import keygen

pytestmark = pytest.mark.asyncio


def pichat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pichat", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def test_a_pi_joins_with_a_token_and_its_worker_needs_no_router_address(
        cluster: Cluster, tmp_path: Path):
    router_keys = tmp_path / "router-keys"
    keygen(router_keys)
    cluster.keys = router_keys
    cluster.router("--keys", str(router_keys))
    assert cluster.join_endpoint
    made = pichat("invite", "--keys", str(router_keys), "--address", cluster.join_endpoint)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()

    pi = tmp_path / "pi9-keys"
    joined = pichat("join", token, "--keys", str(pi), "--name", "pi9")
    assert joined.returncode == 0, joined.stderr
    assert "joined as worker 'pi9'" in joined.stdout
    # Its own key pair, the router's public key, the router's address: nothing else.
    assert sorted(p.name for p in pi.iterdir()) == [
        "router.json", "router.key", "worker.key", "worker.key_secret"]
    own = zmq.auth.load_certificate(pi / "worker.key_secret")
    admitted = zmq.auth.load_certificate(router_keys / "workers" / "pi9.key")[0]
    assert own[0] == admitted
    others = [zmq.auth.load_certificate(p)[1] for p in router_keys.glob("*.key_secret")]
    for path in pi.iterdir():
        assert not any(secret in path.read_bytes() for secret in others), path
    assert zmq.auth.load_certificate(pi / "router.key")[1] is None  # public only

    # The worker finds the router from what join stored, and is admitted by its own key.
    cluster.spawn("pi9", ["worker", "--name", "pi9", "--keys", str(pi), "--backend", "sim",
                          "--heartbeat", "0.5", "--threads", "1"])
    await cluster.wait_workers(1, names={"pi9"})
    listed = pichat("keys", "list", "--keys", str(router_keys))
    assert "worker  pi9" in listed.stdout

    # Revoked: the live worker is disconnected at once, and what it sends after (its
    # READY again, on the CURVE session that outlives its key) is ignored.
    worker = cluster.procs[-1]
    readies = worker.output().count("READY sent")
    assert pichat("keys", "revoke", "pi9", "--keys", str(router_keys)).returncode == 0
    await cluster.wait_workers(0, timeout=10)
    for _ in range(200):  # until the worker has tried to register again
        if worker.output().count("READY sent") > readies:
            break
        await asyncio.sleep(0.05)
    assert worker.output().count("READY sent") > readies
    async with cluster.client() as c:
        assert (await c.status())["workers"] == []
    assert "its key 'pi9' was revoked" in cluster.procs[0].output()

    # The same token again, and a forged one: refused, said so, logged by the router.
    again = pichat("join", token, "--keys", str(tmp_path / "pi10"), "--name", "pi10")
    assert again.returncode == 1 and "already used" in again.stderr
    fresh = pichat("invite", "--keys", str(router_keys), "--address",
                   cluster.join_endpoint).stdout.strip()
    forged = replace(parse(fresh), secret="guessed")
    bad = pichat("join", forged.token(), "--keys", str(tmp_path / "pi11"), "--name", "pi11")
    assert bad.returncode == 1 and "wrong secret" in bad.stderr
    assert not (router_keys / "workers" / "pi11.key").exists()
    ok = pichat("join", fresh, "--keys", str(tmp_path / "pi12"), "--name", "pi12")
    assert ok.returncode == 0  # the forged attempt used nothing of the real token
    assert "join refused" in cluster.procs[0].output()
    assert pichat("keys", "revoke", "pi12", "--keys", str(router_keys)).returncode == 0
    assert not (router_keys / "workers" / "pi12.key").exists()
