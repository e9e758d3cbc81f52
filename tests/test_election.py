"""The floating address's election (pichat/router/daemon/election.py) on a real etcd: one
router at a time holds the key, one that gives its lease back or stops renewing it is
replaced, and a holder cut off from etcd stops saying it holds before etcd can let it go."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from pichat.errors import PichatError
from pichat.memory.etcd import EtcdStore
from pichat.router.daemon.election import Election


@pytest.fixture
async def stores(etcd):
    url = etcd.url + f"/e{secrets.token_hex(6)}/"
    both = [await EtcdStore.open(url), await EtcdStore.open(url)]
    try:
        yield both
    finally:
        for store in both:
            await store.close()


async def test_one_router_holds_the_key_and_the_other_takes_it_when_it_is_given_back(stores):
    a, b = (Election(store, "10.0.0.5", name) for store, name in zip(stores, "ab"))
    await a.round()
    await b.round()
    assert a.holds and not b.holds
    for _ in range(3):  # renewals keep it where it is
        await a.round()
        await b.round()
    assert a.holds and not b.holds and a.won == 1
    await a.resign()  # a router stopping
    await b.round()
    assert b.holds and not a.holds


async def test_a_router_that_stops_renewing_is_replaced_once_its_lease_runs_out(stores):
    a, b = (Election(store, "10.0.0.5", name) for store, name in zip(stores, "ab"))
    await a.round()
    await b.round()
    assert a.holds and not b.holds
    # a dies (no more rounds): b takes the key once etcd lets a's lease go (2 s)

    for _ in range(200):  # until it does (10 s at most)
        await b.round()
        if b.holds:
            break
        await asyncio.sleep(0.05)
    assert b.holds and not a.holds  # a's own word lapsed first (before its lease's end)


async def test_a_holder_cut_off_from_etcd_stops_holding_before_its_lease_ends():
    """The clock and an etcd that stops answering, by hand: the holder says it holds
    until `margin` before the lease's end (counted from before its renewal was sent)."""
    now = [100.0]

    class Etcd:
        down = False

        async def grant(self, ttl):
            return 7

        async def keepalive(self, lease):
            if self.down:
                raise PichatError("cannot be reached")
            return 2

        async def claim(self, root, name, value, lease):
            if self.down:
                raise PichatError("cannot be reached")
            return True

        async def revoke(self, lease):
            pass

    etcd = Etcd()
    seen = Election(etcd, "10.0.0.5", "a", ttl=2, margin=0.5, clock=lambda: now[0])
    await seen.round()
    assert seen.holds
    etcd.down = True
    now[0] = 101.4
    with pytest.raises(PichatError):
        await seen.round()
    assert seen.holds  # 1.4 s after the last renewal was sent: still within 2 - 0.5
    now[0] = 101.5
    assert not seen.holds
    etcd.down = False
    await seen.round()
    assert seen.holds
