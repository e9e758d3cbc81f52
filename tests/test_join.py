"""A new Pi joins with a token (pichat invite / pichat join), real processes: it makes
its own keys, the router admits them, and its worker then needs no --router; a used or
forged token is refused and logged; no secret but its own lands on the Pi."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import zmq.auth

from conftest import ROOT, Cluster
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import RequestFailed
from pichat.invites import parse
from pichat.protocol import ChatMessage
from pichat.security import keygen, resolve_keys

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

    # The worker finds the router from what join stored, is admitted by its own key, and
    # is named as it joined.
    assert json.loads((pi / "router.json").read_text())["name"] == "pi9"
    cluster.spawn("pi9", ["worker", "--keys", str(pi), "--backend", "sim", "--no-discovery",
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
    copied = tmp_path / "pi12"  # a Pi set up the old way: the whole keys directory
    keygen(copied)
    ok = pichat("join", fresh, "--keys", str(copied), "--name", "pi12")
    assert ok.returncode == 0  # the forged attempt used nothing of the real token
    assert "also holds client.key_secret, router.key_secret" in ok.stderr
    assert "join refused" in cluster.procs[0].output()
    assert pichat("keys", "revoke", "pi12", "--keys", str(router_keys)).returncode == 0
    assert not (router_keys / "workers" / "pi12.key").exists()


async def test_replicas_join_with_one_token_each_with_keys_of_their_own(
        cluster: Cluster, tmp_path: Path):
    """compose's replicas: one --join token file and one --keys PARENT/* for all; each
    takes a directory of its own, joins once, and a restart needs no token use."""
    router_keys = tmp_path / "router-keys"
    keygen(router_keys)
    cluster.keys = router_keys
    cluster.router("--keys", str(router_keys))
    token = pichat("invite", "--keys", str(router_keys), "--uses", "2", "--address",
                   cluster.join_endpoint).stdout.strip()
    token_file = tmp_path / "join-token"
    token_file.write_text(token + "\n")
    shared = tmp_path / "replica-keys"

    states = tmp_path / "replica-kv"

    def replica(name: str, log: str | None = None):
        return cluster.spawn(log or name, ["worker", "--name", name, "--join", str(token_file),
                                    "--keys", f"{shared}/*", "--state-dir", f"{states}/*",
                                    "--backend", "sim", "--no-discovery", "--heartbeat", "0.5"])

    def paired(proc) -> str:
        """The number of the keys directory the replica took; its state directory's must
        be the same (its KV states are leased to its key)."""
        out = proc.output()
        n = out.split(f"keys in {shared}/", 1)[1][0]
        assert f"KV states in {states}/{n}" in out and f"kept in {states}/{n}:" in out, out
        return n

    first, second = replica("r1"), replica("r2")
    await cluster.wait_workers(2, names={"r1", "r2"})
    pairs = {zmq.auth.load_certificate(shared / n / "worker.key_secret")[0] for n in "01"}
    admitted = {zmq.auth.load_certificate(router_keys / "workers" / f"{n}.key")[0]
                for n in ("r1", "r2")}
    assert pairs == admitted and len(pairs) == 2
    for n in "01":  # the router's address came with the token; no secret but its own
        assert sorted(p.name for p in (shared / n).iterdir()) == [
            ".lock", "router.json", "router.key", "worker.key", "worker.key_secret"]

    taken = paired(first)
    assert {taken, paired(second)} == {"0", "1"}

    # A restart: the token is used up, and not needed (the replica joined already); the
    # replica takes its keys and its states back together.
    assert first.stop() == 0
    again = replica("r1", log="r1-again")
    await cluster.wait_workers(2, names={"r1", "r2"})
    assert "joined the cluster" not in again.output()
    assert paired(again) == taken
    assert not list((router_keys / "invites").glob("*.json"))

    # A third replica, with the token used up: a clear refusal, no retrying.
    third = replica("r3")
    assert third.popen.wait(60) == 1
    assert "already used" in third.output()
    assert not (shared / "2" / "worker.key").exists() or not (
        router_keys / "workers" / "r3.key").exists()
    del second


async def test_worker_join_refuses_a_client_token_and_an_unreadable_token_file(
        tmp_path: Path):
    keys = tmp_path / "router-keys"
    keygen(keys)
    client_token = pichat("invite", "--keys", str(keys), "--role", "client", "--address",
                          "tcp://127.0.0.1:9").stdout.strip()
    wrong = pichat("worker", "--join", client_token, "--keys", str(tmp_path / "pi"),
                   "--backend", "sim", "--no-discovery")
    assert wrong.returncode == 1 and "this is a client token" in wrong.stderr
    missing = pichat("worker", "--join", str(tmp_path / "nothing"), "--keys",
                     str(tmp_path / "pi"), "--backend", "sim", "--no-discovery")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    file = tmp_path / "a-file"
    file.write_text("")
    unusable = pichat("worker", "--join", client_token, "--keys", f"{file}/keys/*",
                      "--backend", "sim", "--no-discovery")
    assert unusable.returncode == 1 and "cannot use" in unusable.stderr, unusable.stderr


async def test_worker_join_keeps_trying_a_router_that_does_not_answer_yet(
        cluster: Cluster, tmp_path: Path):
    """A deployment starts workers and router together: a join that gets no answer is
    tried again (a refused token is not: see the replicas test)."""
    router_keys = tmp_path / "router-keys"
    keygen(router_keys)
    cluster.keys = router_keys
    router = cluster.router("--keys", str(router_keys))
    token = pichat("invite", "--keys", str(router_keys), "--address",
                   cluster.join_endpoint).stdout.strip()
    router.signal(signal.SIGSTOP)  # there, but answering nothing (still starting)
    try:
        late = cluster.spawn("late", ["worker", "--name", "late", "--join", token, "--keys",
                                      str(tmp_path / "late"), "--backend", "sim",
                                      "--no-discovery", "--heartbeat", "0.5"])
        assert "trying again" in await late.wait_output("trying again", timeout=90)
        assert late.alive()
    finally:
        router.signal(signal.SIGCONT)
    await cluster.wait_workers(1, names={"late"})
    assert "joined the cluster as 'late'" in late.output()


async def test_a_lan_search_that_cannot_run_is_a_log_line_not_a_crash(tmp_path, monkeypatch,
                                                                      caplog):
    """systemd's sandbox without AF_NETLINK: listing the interfaces fails."""
    import pichat.discovery as discovery

    async def unsupported(*args, **kwargs):
        raise OSError(97, "Address family not supported by protocol")

    monkeypatch.setattr(discovery, "find", unsupported)
    assert await discovery.relocate(tmp_path, "k" * 40, "workers", "tcp://10.0.0.1:5556") is None
    assert "cannot look for the router on the LAN" in caplog.text


async def test_with_two_routers_a_silent_one_is_not_taken_for_the_other_and_both_stay_kept(
        tmp_path):
    """A worker registered with two routers sharing one key, one of them silent: the LAN
    search skips the router it already has (seen in the systemd HA e2e: the silent
    router's registration moved onto the other, and never came back to it), and what a
    joined Pi keeps names both routers, the silent one's new address in its place."""
    import pichat.discovery as discovery
    from pichat.invites import remember_router, stored_router

    silent, other, moved = "tcp://10.0.0.1:5556", "tcp://10.0.0.2:5556", "tcp://10.0.0.7:5556"
    remember_router(tmp_path, {"workers": f"{silent},{other}"})
    announced = [other]
    asked = []

    async def finder(key, role, timeout, avoid):  # find's contract: the first not avoided
        asked.append(avoid)
        return next((e for e in announced if e not in avoid), None)

    assert await discovery.relocate(tmp_path, "k" * 40, "workers", silent,
                                    avoid=frozenset({other}), finder=finder) is None
    assert asked == [frozenset({other})]
    # Swarm names a router by its service name; the LAN announces its address.
    announced.insert(0, "tcp://127.0.0.1:5556")
    assert await discovery.relocate(tmp_path, "k" * 40, "workers", silent,
                                    avoid=frozenset({"tcp://localhost:5556", other}),
                                    finder=finder) is None
    announced.pop(0)
    assert stored_router(tmp_path, "workers") == f"{silent},{other}"
    announced.append(moved)  # the silent router comes back elsewhere
    assert await discovery.relocate(tmp_path, "k" * 40, "workers", silent,
                                    avoid=frozenset({other}), finder=finder) == moved
    assert stored_router(tmp_path, "workers") == f"{moved},{other}"
    # One router kept, found elsewhere: replaced, as before.
    remember_router(tmp_path, {"workers": silent})
    assert await discovery.relocate(tmp_path, "k" * 40, "workers", silent,
                                    finder=finder) == other
    assert stored_router(tmp_path, "workers") == other


async def test_a_revoked_client_stays_out_on_its_open_connection_and_nobody_gets_its_name(
        cluster: Cluster, tmp_path: Path):
    """Revocation by name was a hole: anyone with a client token could join as the revoked
    name with a new key, own its stored conversations, and so let the revoked device's
    open connection in again. A name is now its key's for good."""
    router_keys = tmp_path / "router-keys"
    keygen(router_keys)
    router = cluster.router("--keys", str(router_keys))

    def token() -> str:
        return pichat("invite", "--keys", str(router_keys), "--role", "client", "--address",
                      cluster.join_endpoint).stdout.strip()

    def client(keys: Path) -> Client:
        return Client(ClientConfig(router=cluster.client_endpoint, keys=resolve_keys(str(keys)),
                                   silence_timeout=60))

    laptop = tmp_path / "laptop"
    assert pichat("join", token(), "--keys", str(laptop), "--name", "laptop").returncode == 0
    async with client(laptop) as old:
        mine = await old.conversations("create", title="my diary")
        assert [c["id"] for c in (await old.conversations("list"))] == [
            mine["id"]]
        assert pichat("keys", "revoke", "laptop", "--keys", str(router_keys)).returncode == 0
        assert "clients revoked: laptop" in await router.wait_output("clients revoked", 30)
        # The open connection (its CURVE session outlives the key) is refused, and told.
        for ask in (old.status(), old.conversations("list")):
            with pytest.raises(RequestFailed, match="revoked"):
                await ask
        with pytest.raises(RequestFailed, match="revoked"):
            await old.chat([ChatMessage("user", "hi")])

        # The name is not given again, and the refusal used nothing of the token.
        again = token()
        thief = tmp_path / "thief"
        taken = pichat("join", again, "--keys", str(thief), "--name", "laptop")
        assert taken.returncode == 1 and "was revoked" in taken.stderr, taken.stderr
        assert not (router_keys / "clients" / "laptop.key").exists()
        # Nor is the revoked key, under a new name (the device itself joining again).
        reused = pichat("join", again, "--keys", str(laptop), "--name", "laptop-2")
        assert reused.returncode == 1 and "key was revoked" in reused.stderr, reused.stderr
        ok = pichat("join", again, "--keys", str(thief), "--name", "thief")
        assert ok.returncode == 0, ok.stderr
        async with client(thief) as other:
            assert await other.conversations("list") == []

        # A key file put back by hand under the revoked name (a backup restored) does not
        # let the old connection in again either.
        (router_keys / "clients" / "laptop.key").write_text(
            (thief / "client.key").read_text())
        assert "was revoked" in await router.wait_output("was revoked (", 30)
        with pytest.raises(RequestFailed, match="revoked"):
            await old.status()


async def test_an_announced_address_is_followed_and_kept_only_once_it_proved_the_key(
        cluster: Cluster, tmp_path: Path):
    """A spoofed mDNS answer (any host on the LAN can send one, with the right key in its
    TXT record) was written to router.json before any handshake: a fake listener then kept
    the Pi stuck. Now an address is used and kept only after a CURVE handshake with the
    router's key succeeded there."""
    import zmq
    import zmq.asyncio

    import pichat.discovery as discovery
    from pichat.invites import stored_router

    router_keys = tmp_path / "router-keys"
    keygen(router_keys)
    cluster.router("--keys", str(router_keys))
    token = pichat("invite", "--keys", str(router_keys), "--address",
                   cluster.join_endpoint).stdout.strip()
    pi = tmp_path / "pi"
    assert pichat("join", token, "--keys", str(pi), "--name", "pi").returncode == 0
    keys = resolve_keys(str(pi))
    key = keys.router_public().decode()
    kept = (pi / "router.json").read_text()

    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    ctx = zmq.asyncio.Context()
    other_key = ctx.socket(zmq.ROUTER)  # CURVE, but another key pair
    other_key.curve_server = True
    other_key.curve_publickey, other_key.curve_secretkey = zmq.curve_keypair()
    plain = ctx.socket(zmq.ROUTER)  # no CURVE at all
    fakes = [f"tcp://127.0.0.1:{silent.sockets[0].getsockname()[1]}"]
    for sock in (other_key, plain):
        sock.bind("tcp://127.0.0.1:0")
        fakes.append(sock.last_endpoint.decode())
    try:
        for fake in fakes:
            async def spoofed(k, role, timeout, avoid, fake=fake):
                return fake

            assert await discovery.relocate(pi, key, "workers", "tcp://10.255.0.1:1", 3.0,
                                            keys=keys, key_name="worker",
                                            finder=spoofed) is None, fake
            assert (pi / "router.json").read_text() == kept
        moved = "tcp://localhost:" + cluster.worker_endpoint.rsplit(":", 1)[1]

        async def real(k, role, timeout, avoid):
            return moved

        assert await discovery.relocate(pi, key, "workers", cluster.worker_endpoint, 30.0,
                                        keys=keys, key_name="worker", finder=real) == moved
        assert stored_router(pi, "workers") == moved
    finally:
        silent.close()
        for writer in accepted:
            writer.close()
        for sock in (other_key, plain):
            sock.close(linger=0)
        ctx.term()


async def test_a_worker_whose_ready_is_never_answered_says_why(cluster: Cluster):
    """A worker pointed where no router serves workers (a router bound to 127.0.0.1 seen
    from another Pi, a wrong port) used to retry in silence: `pichat status` said "no
    workers connected" and neither log said why."""
    import socket

    refusing = socket.socket()  # bound, never listening: connections are refused
    refusing.bind(("127.0.0.1", 0))
    accepted: list[asyncio.StreamWriter] = []
    mute = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    try:
        for port, why in ((refusing.getsockname()[1], "nothing accepts connections there"),
                          (mute.sockets[0].getsockname()[1], "something accepts connections")):
            worker = cluster.spawn(f"w{port}", [
                "worker", "--router", f"tcp://127.0.0.1:{port}", "--backend", "sim",
                "--no-discovery", "--heartbeat", "0.5", "--name", f"w{port}"])
            out = await worker.wait_output("never answered this worker's READY", timeout=60)
            assert why in out, out
            assert "--workers-bind" in out or "another port" in out
            worker.stop()
    finally:
        refusing.close()
        mute.close()
        for writer in accepted:
            writer.close()


async def test_an_invitation_naming_where_nothing_answers_says_so(tmp_path: Path):
    import socket

    keygen(tmp_path / "keys")
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    try:
        address = f"tcp://127.0.0.1:{refusing.getsockname()[1]}"
        made = pichat("invite", "--keys", str(tmp_path / "keys"), "--address", address)
    finally:
        refusing.close()
    assert made.returncode == 0 and made.stdout.startswith("pichat1.")
    assert f"nothing answers at {address}" in made.stderr and "--address" in made.stderr
