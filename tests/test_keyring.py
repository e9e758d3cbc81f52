"""Two routers' keys directories kept alike through a real etcd (pichat/router/daemon/
keyring.py): what is admitted, revoked or invited on either reaches the other; a router
that was away learns what changed and shares what it alone has; what etcd holds is checked
like a peer's message."""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

import pytest
import zmq
import zmq.auth

from pichat.invites import InviteRefused, admit, invite, join, revoke
from pichat.memory.etcd import EtcdStore
from pichat.router.daemon import keyring as keyring_module
from pichat.router.daemon.keyring import ROOT, KeyRing
from pichat.security import AllowList, keygen

pytestmark = pytest.mark.asyncio


def public_key() -> str:
    return zmq.curve_keypair()[0].decode()


@pytest.fixture
async def two(etcd, tmp_path: Path):
    """Router A's keys directory, B's (a copy, as the docs say to set B up), and a store
    connection each on one fresh prefix."""
    a, b = tmp_path / "a", tmp_path / "b"
    keygen(a)
    shutil.copytree(a, b)
    url = etcd.url + f"/k{secrets.token_hex(6)}/"
    stores = [await EtcdStore.open(url), await EtcdStore.open(url)]
    try:
        yield a, b, stores
    finally:
        for store in stores:
            await store.close()


def ring(store: EtcdStore, keys: Path) -> KeyRing:
    return KeyRing(store, keys, interval=0.25)


def admitted(keys: Path, role: str = "workers") -> set[str]:
    return {p.stem for p in (keys / role).glob("*.key")}


async def test_what_either_router_admits_revokes_or_invites_reaches_the_other(two):
    a, b, (sa, sb) = two
    ra, rb = ring(sa, a), ring(sb, b)
    await ra.sync()
    await rb.sync()
    assert admitted(a) == admitted(b) == {"worker"}

    key = public_key()
    admit(a, "worker", "pi9", key)
    await ra.sync()
    assert await rb.sync() == 1
    assert (b / "workers" / "pi9.key").read_bytes() == (a / "workers" / "pi9.key").read_bytes()
    allow = AllowList(a / "workers", "workers", a)
    assert allow.lookup(key.encode(), 0.0) == "pi9"

    revoke(b, "pi9")  # on the other router
    await rb.sync()
    await ra.sync()
    assert "pi9" not in admitted(a) and (a / "revoked" / "workers" / "pi9.key").is_file()
    assert allow.lookup(key.encode(), 1.0) is None
    assert allow.poll(2.0) == {"pi9"}  # what makes the router disconnect it

    # A one-use invitation made on A and used through B is used up on A too.
    made = invite(a, role="worker", addresses=("tcp://10.0.0.1:5557",), router_key="k" * 40,
                  uses=1)
    await ra.sync()
    await rb.sync()
    assert (b / "invites" / f"{made.id}.json").is_file()
    join(b, made.id, made.secret, "pi10", public_key())
    await rb.sync()
    await ra.sync()
    assert "pi10" in admitted(a)
    with pytest.raises(InviteRefused, match="already used"):
        join(a, made.id, made.secret, "pi11", public_key())
    assert ra.pushed and rb.pushed and ra.pulled and rb.pulled


async def test_a_router_that_was_away_learns_what_changed_and_shares_what_it_alone_has(two):
    a, b, (sa, sb) = two
    admit(a, "client", "laptop", public_key())
    await ring(sa, a).sync()
    await ring(sb, b).sync()
    assert "laptop" in admitted(b, "clients")
    ra = ring(sa, a)
    await ra.sync()
    # B is down: on A the laptop is revoked and an invitation is made; on B (by hand,
    # while its router is stopped) a worker is admitted.
    revoke(a, "laptop")
    made = invite(a, role="client", addresses=("tcp://10.0.0.1:5557",), router_key="k" * 40)
    await ra.sync()
    admit(b, "worker", "pi3", public_key())

    rb = ring(sb, b)  # B starts again: a new ring, nothing agreed yet
    await rb.sync()
    assert "laptop" not in admitted(b, "clients")
    assert (b / "revoked" / "clients" / "laptop.key").is_file()
    assert (b / "invites" / f"{made.id}.json").is_file()
    await ra.sync()
    assert "pi3" in admitted(a)
    assert await ra.sync() == await rb.sync() == 0  # settled: nothing goes back and forth


async def test_a_file_changed_on_both_routers_at_once_keeps_the_first_written(two, caplog):
    a, b, (sa, sb) = two
    ra, rb = ring(sa, a), ring(sb, b)
    await ra.sync()
    await rb.sync()
    first, second = public_key(), public_key()
    admit(a, "worker", "pi5", first)
    admit(b, "worker", "pi5", second)
    await ra.sync()
    with caplog.at_level(logging.WARNING, "pichat.router.daemon.keyring"):
        await rb.sync()
    assert "changed on this router and on another at once" in caplog.text
    assert first in (b / "workers" / "pi5.key").read_text()
    await ra.sync()
    assert first in (a / "workers" / "pi5.key").read_text()


async def test_what_etcd_holds_is_checked_as_a_peer_s_message(two, monkeypatch, caplog):
    """Names that are no shared file's (a path out of the directory, a key pair), values
    too big or not text: skipped and logged, nothing written where they point."""
    a, _, (sa, _) = two
    hostile = {
        "../../escaped.key": b"x",
        "workers/../../../escaped.key": b"x",
        "router.key_secret": b"stolen",
        "api-keys": b"pichat-mine\n",
        "workers/sub/dir.key": b"x",
        "workers/big.key": b"#" * (keyring_module.MAX_BYTES + 1),
        "workers/binary.key": b"\xff\xfe",
    }
    for name, value in hostile.items():
        assert await sa.swap(ROOT, name, value, 0)
    before = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    secret = (a / "router.key_secret").read_bytes()
    ra = ring(sa, a)
    with caplog.at_level(logging.WARNING, "pichat.router.daemon.keyring"):
        await ra.sync()
        ra.throttle.flush(1e12)
    assert sorted(str(p.relative_to(a)) for p in a.rglob("*")) == before
    assert (a / "router.key_secret").read_bytes() == secret
    assert not (a.parent / "escaped.key").exists() and not Path("/escaped.key").exists()
    assert "skipping keys/" in caplog.text

    # At most MAX_FILES shared files: one more, from etcd or from here, is not taken.
    monkeypatch.setattr(keyring_module, "MAX_FILES", len(ra.agreed) + 1)
    assert await sa.swap(ROOT, "clients/one.key", (a / "client.key").read_bytes(), 0)
    assert await sa.swap(ROOT, "clients/two.key", (a / "client.key").read_bytes(), 0)
    await ra.sync()
    assert len(admitted(a, "clients") - {"client"}) == 1


async def test_an_invitation_s_last_use_taken_through_both_routers_at_once_counts_once(two):
    """Both routers read the invitation, both let a Pi join with its last use: only one
    write lands in etcd; the other join is undone before anything of it leaves, and that
    router finds the invitation used."""
    a, b, (sa, sb) = two
    ra, rb = ring(sa, a), ring(sb, b)
    made = invite(a, role="worker", addresses=("tcp://10.0.0.1:5557",), router_key="k" * 40)
    await ra.sync()
    await rb.sync()
    rel = f"invites/{made.id}.json"
    undone: list[str] = []
    async with ra.lock, rb.lock:
        await ra.round()
        await rb.round()
        _, path_a = join(a, made.id, made.secret, "pi1", public_key())
        _, path_b = join(b, made.id, made.secret, "pi2", public_key())
        won_a = await ra.settle(rel, lambda: (undone.append("a"), path_a.unlink()))
        won_b = await rb.settle(rel, lambda: (undone.append("b"), path_b.unlink()))
    assert (won_a, won_b) == (True, False) and undone == ["b"]
    await ra.sync()
    await rb.sync()
    await ra.sync()
    assert admitted(a) == admitted(b) == {"worker", "pi1"}
    for keys in (a, b):
        with pytest.raises(InviteRefused, match="already used"):
            join(keys, made.id, made.secret, "pi3", public_key())


async def test_a_tombstone_that_cannot_be_read_here_is_not_shared_as_removed(two):
    """A revoked key's tombstone unreadable on A (a permission gone wrong) or grown past
    the bound is not a removal: B keeps it, and the key stays out on both."""
    a, b, (sa, sb) = two
    admit(a, "worker", "pi7", public_key())
    revoke(a, "pi7")
    ra, rb = ring(sa, a), ring(sb, b)
    await ra.sync()
    await rb.sync()
    tomb = "revoked/workers/pi7.key"
    assert (b / tomb).is_file()
    assert await ra.sync() == 0  # its own writes come back: agreed, nothing to do
    (a / tomb).write_text("#" * (keyring_module.MAX_BYTES + 1))
    await ra.sync()
    await rb.sync()
    assert (b / tomb).is_file() and "pi7" not in admitted(b)
