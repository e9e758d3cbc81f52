"""Two routers sharing one conversation store in etcd (three real members on loopback):
a router's death costs no stored turn, and two routers answering one conversation at once
cannot fork its history."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, Cluster
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import RequestFailed, RouterUnavailable
from pichat.invites import parse
from pichat.memory.etcd import EtcdStore
from pichat.protocol import ChatMessage, Sampling
from pichat.security import keygen, resolve_keys

GREEDY = Sampling(temperature=0, max_tokens=60)


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


@pytest.fixture
def etcd3():
    from etcd import EtcdCluster

    cluster, why = EtcdCluster.start(3)
    if cluster is None:
        pytest.skip(why)
    yield cluster
    cluster.stop()


@pytest.fixture
def pair(cluster: Cluster, tmp_path: Path, etcd3):
    """Routers A (`cluster`) and B on one etcd store, one worker serving both."""
    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    db = etcd3.url + "/ha/"
    try:
        cluster.router("--db", db)
        other.router("--db", db)
        cluster.spawn("w", [
            "worker", "--router", f"{cluster.worker_endpoint},{other.worker_endpoint}",
            "--name", "w", "--backend", "sim", "--no-discovery", "--heartbeat", "0.5",
            "--liveness", "30", "--slots", "2", "--sim-reply-tokens", "8",
            "--sim-gen-tps", "40"])
        yield cluster, other, etcd3
    finally:
        other.close()


async def test_a_router_host_dies_and_its_stored_conversations_go_on_through_the_other(
        pair):
    """Turns kept through A; A SIGKILLed and the etcd member beside it too (its host
    died): the client, given both routers, lists and continues the conversation through
    B, and nothing acknowledged is missing."""
    a, b, etcd = pair
    for c in (a, b):
        await c.wait_workers(1, names={"w"})
    both = f"{a.client_endpoint},{b.client_endpoint}"
    async with Client(ClientConfig(router=both, silence_timeout=2.0)) as client:
        first = await client.chat(user("My name is Ada."), sampling=GREEDY,
                                  conversation="intro")
        second = await client.chat(user("I live in Lyon."), sampling=GREEDY,
                                   conversation="intro")
        assert client.endpoint == a.client_endpoint
        a.procs[0].kill()
        etcd.kill(0)  # A's host held a member: two of three are left
        third = await client.chat(user("Where do I live?"), sampling=GREEDY,
                                  conversation="intro")
        assert client.endpoint == b.client_endpoint
        assert third.done.conversation == first.done.conversation
        listed = await client.conversations("list")
        assert [(c["title"], c["messages"]) for c in listed] == [("intro", 6)]
        stored = await client.conversations("get", id=first.done.conversation)
    assert [m["content"] for m in stored["messages"]] == [
        "My name is Ada.", first.text, "I live in Lyon.", second.text,
        "Where do I live?", third.text]


async def test_one_conversation_answered_through_both_routers_at_once_keeps_one_history(
        pair):
    """A turn of a conversation through A and another through B at the same time (each
    router alone would refuse the second): both are answered, only the first to finish is
    kept, and the conversation's history stays one line, with no turn from each."""
    a, b, _ = pair
    for c in (a, b):
        await c.wait_workers(1, names={"w"})
    async with a.client() as ca, b.client() as cb:
        first = await ca.chat(user("Hello."), sampling=GREEDY, conversation="race")
        cid = first.done.conversation
        slow = Sampling(temperature=0, max_tokens=60)
        one, two = await asyncio.gather(
            ca.chat(user("through A"), sampling=slow, conversation=cid),
            cb.chat(user("through B"), sampling=slow, conversation=cid),
            return_exceptions=True)
        # The one finished second is told it was not kept (no DONE to count on).
        failed = [r for r in (one, two) if isinstance(r, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], RequestFailed), (one, two)
        assert "not kept" in str(failed[0]) and "continued elsewhere" in str(failed[0])
        stored = await cb.conversations("get", id=cid)
    contents = [m["content"] for m in stored["messages"]]
    assert len(contents) == 4 and contents[:2] == ["Hello.", first.text]
    kept = ["through A", one.text] if failed[0] is two else ["through B", two.text]
    assert contents[2:] == kept
    logs = a.procs[0].output() + b.procs[0].output()
    assert "continued elsewhere" in logs


async def test_a_kept_turn_sent_again_through_the_other_router_is_not_answered_twice(pair):
    """A client whose router went silent after keeping its turn (the answer lost on the
    way) sends the same request to the other router: it gets the kept answer, and the
    conversation holds the turn once (seen in the split-brain fault lab: a stalled router
    kept the turn, and the client's resend was answered a second time on top of it)."""
    a, b, _ = pair
    for c in (a, b):
        await c.wait_workers(1, names={"w"})
    async with a.client() as ca, b.client() as cb:
        first = await ca.chat(user("Hello."), sampling=GREEDY, conversation="resent")
        cid = first.done.conversation
        second = await ca.chat(user("Again?"), sampling=GREEDY, conversation=cid,
                               request_id="turn-2")
        again = await cb.chat(user("Again?"), sampling=GREEDY, conversation=cid,
                              request_id="turn-2")
        assert again.text == second.text and again.done.conversation == cid
        fresh = await cb.chat(user("Again?"), sampling=GREEDY, conversation=cid)
        stored = await cb.conversations("get", id=cid)
    assert [m["content"] for m in stored["messages"]] == [
        "Hello.", first.text, "Again?", second.text, "Again?", fresh.text]
    assert "its kept answer sent again" in b.procs[0].output()


async def test_status_lists_every_router_and_which_holds_the_floating_address(
        cluster: Cluster, tmp_path: Path):
    """`pichat status --router A,B`: each router, answering or not, and the one whose host
    holds the floating address (an address of this host: loopback's, for A; a TEST-NET
    one nobody here holds, for B); /metrics says it too."""
    import subprocess
    import sys

    import aiohttp

    (tmp_path / "other").mkdir()
    other = Cluster(tmp_path / "other")
    try:
        cluster.router("--floating-address", "127.0.0.1")
        other.router("--floating-address", "192.0.2.7")
        both = f"{cluster.client_endpoint},{other.client_endpoint}"

        def status() -> str:
            out = subprocess.run([sys.executable, "-m", "pichat", "status", "--router", both,
                                  "--keys", "off"], capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            return out.stdout

        shown = status()
        assert "floating address 127.0.0.1: this router holds it since" in shown, shown
        lines = [line for line in shown.splitlines() if line.startswith("  tcp://")]
        assert len(lines) == 2, shown
        assert lines[0].startswith(f"  {cluster.client_endpoint}  up ")
        assert "holds 127.0.0.1 since " in lines[0], shown
        assert "holds" not in lines[1] and "0 workers" in lines[1]
        async with aiohttp.ClientSession() as http:
            for url, held in ((cluster.http_url, 1), (other.http_url, 0)):
                async with http.get(f"{url}/metrics") as r:
                    text = await r.text()
                assert f"pichat_floating_address_held {held}.0" in text
                assert f"pichat_floating_address_acquired_total {held}.0" in text
        cluster.procs[0].kill()
        cluster.procs[0].popen.wait()
        lines = [line for line in status().splitlines() if line.startswith("  tcp://")]
        assert lines[0].startswith(f"  {cluster.client_endpoint}  not answering")
        assert lines[1].startswith(f"  {other.client_endpoint}  up ")
    finally:
        other.close()


async def test_only_the_elected_router_passes_the_floating_check_and_a_stop_hands_it_on(
        cluster: Cluster, tmp_path: Path, etcd):
    """Two routers on one etcd, both on a host holding the address: only the first to
    start passes GET /health/floating (keepalived's check with the election); stopped, it
    gives its lease back, and the other passes at once (no lease to wait out)."""
    import aiohttp

    (tmp_path / "b").mkdir()
    other = Cluster(tmp_path / "b")
    db = etcd.url + f"/el{secrets.token_hex(6)}/"
    try:
        a = cluster.router("--db", db, "--floating-address", "127.0.0.1")
        other.router("--db", db, "--floating-address", "127.0.0.1")
        async with aiohttp.ClientSession() as http:
            async def passes(url: str) -> bool:
                async with http.get(f"{url}/health/floating") as r:
                    return r.status == 200

            assert await passes(cluster.http_url) and not await passes(other.http_url)
            async with http.get(f"{other.http_url}/metrics") as r:
                assert r.status == 200
            store = await EtcdStore.open(db)
            try:
                held = await store.get_item("floating/", "127.0.0.1/holder")
                assert held is not None and cluster.client_endpoint in held.decode()
                assert a.stop() == 0
                # Handed back as it stopped, not left to run out (2 s): A's key is gone.
                after = await store.get_item("floating/", "127.0.0.1/holder")
                assert after is None or cluster.client_endpoint not in after.decode()
            finally:
                await store.close()
            for _ in range(100):
                if await passes(other.http_url):
                    break
                await asyncio.sleep(0.05)
            assert await passes(other.http_url)
    finally:
        other.close()


def test_the_floating_address_is_seen_taken_and_given_up():
    from pichat.router.observe.floating import FloatingAddress, is_local

    assert is_local("127.0.0.1") and not is_local("192.0.2.7")
    holds = [False]
    clock = iter(range(100, 200))
    seen = FloatingAddress("10.0.0.5", held=lambda _: holds[0], clock=lambda: next(clock))
    assert not seen.check() and seen.as_status() == {
        "address": "10.0.0.5", "held": False, "since": None, "acquired": 0, "failovers": 0,
        "last_failover": None}
    holds[0] = True  # keepalived moved it here (a failover)
    assert seen.check() and not seen.check()
    assert seen.as_status() == {"address": "10.0.0.5", "held": True, "since": 100,
                                "acquired": 1, "failovers": 0, "last_failover": None}
    holds[0] = False
    assert seen.check() and (seen.held, seen.since, seen.acquired) == (False, 101, 1)
    holds[0] = True
    assert seen.check() and seen.acquired == 2


def _record(router, at) -> bytes:
    return json.dumps({"router": router, "at": at}).encode()


@pytest.mark.parametrize(("previous", "failover"), [
    (None, None),  # the first holder
    (_record("pi1 tcp://10.0.0.1:5555", 98.5), ("pi1 tcp://10.0.0.1:5555", 1.5)),
    (_record("pi2 tcp://10.0.0.2:5555", 98.5), None),  # its own (restarted, took it back)
    (_record("pi1 tcp://10.0.0.1:5555", 100.4), ("pi1 tcp://10.0.0.1:5555", 0.0)),  # both
    (_record("pi1", float("inf")), None),  # not a time
    (_record("pi1", True), None),
    (_record("", 98.0), None),
    (_record("x" * 257, 98.0), None),
    (_record(7, 98.0), None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (json.dumps({"router": "pi1", "at": 98.0, "pad": "x" * 1100}).encode(), None),  # > 1 KiB
])
def test_the_router_taking_the_address_reads_whom_it_came_from_and_when(previous, failover):
    """The shared record as the taking router found it: a failover (from whom, how long
    with no holder) only from another router's well-formed record; anything else, a
    hostile one among them, is no failover and no crash."""
    from pichat.router.observe.floating import FloatingAddress

    seen = FloatingAddress("10.0.0.5", held=lambda _: True, clock=lambda: 100.0,
                           name="pi2 tcp://10.0.0.2:5555")
    assert seen.check() and seen.taken
    seconds = seen.took(previous)
    assert not seen.taken
    if failover is None:
        assert seconds is None and seen.failovers == 0 and seen.last_failover is None
    else:
        assert seconds == pytest.approx(failover[1]) and seen.failovers == 1
        assert seen.last_failover == {"from": failover[0], "at": 100.0,
                                      "seconds": round(failover[1], 2)}
    assert json.loads(seen.record()) == {"router": "pi2 tcp://10.0.0.2:5555", "at": 100.0}


def pichat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pichat", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def keyed(cluster: Cluster, tmp_path: Path, etcd):
    """Routers A (`cluster`) and B on one etcd, each with its own copy of one keys
    directory (as the docs say to set B up): A, B, A's keys, B's keys."""
    a_keys, b_keys = tmp_path / "a-keys", tmp_path / "b-keys"
    keygen(a_keys)
    shutil.copytree(a_keys, b_keys)
    (tmp_path / "b").mkdir()
    other = Cluster(tmp_path / "b")
    db = etcd.url + f"/ha{secrets.token_hex(6)}/"
    cluster.keys, other.keys = a_keys, b_keys
    try:
        cluster.router("--keys", str(a_keys), "--db", db)
        other.router("--keys", str(b_keys), "--db", db)
        yield cluster, other, a_keys, b_keys
    finally:
        other.close()


async def test_admitted_through_either_router_and_revoked_on_either_holds_on_both(
        keyed, tmp_path: Path):
    """A worker that joins through A is served by B, a client that joins through B is let
    in by A, and a key revoked on B's Pi is put out by A, within a heartbeat."""
    cluster, other, a_keys, b_keys = keyed
    a = cluster.procs[0]
    token = pichat("invite", "--keys", str(a_keys), "--address", cluster.join_endpoint)
    pi = tmp_path / "pi9"
    joined = pichat("join", token.stdout.strip(), "--keys", str(pi), "--name", "pi9")
    assert joined.returncode == 0, joined.stderr
    cluster.spawn("pi9", [
        "worker", "--keys", str(pi), "--router",
        f"{cluster.worker_endpoint},{other.worker_endpoint}", "--backend", "sim",
        "--no-discovery", "--heartbeat", "0.5", "--threads", "1"])
    await other.wait_workers(1, names={"pi9"})  # B never saw the join
    await cluster.wait_workers(1, names={"pi9"})

    token = pichat("invite", "--keys", str(b_keys), "--role", "client", "--address",
                   other.join_endpoint)
    laptop = tmp_path / "laptop"
    joined = pichat("join", token.stdout.strip(), "--keys", str(laptop), "--name",
                    "laptop")
    assert joined.returncode == 0, joined.stderr
    config = ClientConfig(router=cluster.client_endpoint, keys=resolve_keys(str(laptop)),
                          silence_timeout=5.0)
    for _ in range(100):  # until A has it: a round of its key ring, within a heartbeat
        try:
            async with Client(config) as client:
                reply = await client.chat(user("hi"), sampling=GREEDY)
            break
        except RouterUnavailable:
            continue
    assert reply.text and reply.done.worker == "pi9"

    assert pichat("keys", "revoke", "pi9", "--keys", str(b_keys)).returncode == 0
    revoked_at = time.monotonic()
    assert "its key 'pi9' was revoked" in await a.wait_output("its key 'pi9'", 30)
    took = time.monotonic() - revoked_at
    await cluster.wait_workers(0, timeout=30)
    assert (a_keys / "revoked" / "workers" / "pi9.key").is_file()
    print(f"revoked on B, put out by A after {took:.2f} s (heartbeat 0.5 s)")


async def test_a_pi_joined_through_one_router_knows_both_and_outlives_either(
        keyed, tmp_path: Path):
    """`pichat join` through A (the token naming only A): the Pi is told every router
    sharing A's store, so a worker started with its keys alone (no --router) registers
    with both, and a client with its keys alone is answered with A dead (through B)."""
    cluster, other, a_keys, _ = keyed
    kept = {}
    for role, name in (("worker", "pi7"), ("client", "laptop")):
        token = pichat("invite", "--keys", str(a_keys), "--role", role, "--address",
                       cluster.join_endpoint)
        joined = pichat("join", token.stdout.strip(), "--keys", str(tmp_path / name),
                        "--name", name)
        assert joined.returncode == 0, joined.stderr
        assert "named 2 routers" in joined.stderr
        kept[role] = json.loads((tmp_path / name / "router.json").read_text())
    both = {"workers": f"{cluster.worker_endpoint},{other.worker_endpoint}",
            "clients": f"{cluster.client_endpoint},{other.client_endpoint}"}
    assert {k: kept["worker"][k] for k in both} == both
    cluster.spawn("pi7", ["worker", "--keys", str(tmp_path / "pi7"), "--backend", "sim",
                          "--no-discovery", "--heartbeat", "0.5", "--threads", "1"])
    for router in (cluster, other):
        await router.wait_workers(1, names={"pi7"})
    cluster.procs[0].kill()
    cluster.procs[0].popen.wait()
    asked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pichat", "ask", "--keys",
                         str(tmp_path / "laptop"), "--temperature", "0", "hello"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip()


@pytest.mark.parametrize(("raw", "listed"), [
    (b'{"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555", "at": 990}',
     [("tcp://10.0.0.2:5556", "tcp://10.0.0.2:5555")]),
    (b'{"workers": "tcp://10.0.0.1:5556", "clients": "tcp://10.0.0.1:5555", "at": 990}',
     []),  # this router's own
    (b'{"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555", "at": 1}',
     []),  # not refreshed for a week: gone for good
    (b'{"workers": "tcp://x:1,tcp://y:2", "clients": "tcp://10.0.0.2:5555", "at": 990}',
     []),  # two in one: a joiner would be told a list it did not ask for
    (b'{"workers": "ipc:///tmp/evil", "clients": "tcp://10.0.0.2:5555", "at": 990}', []),
    (b'{"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555", "at": true}',
     []),
    (b'{"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555"}', []),
    (b"[]", []), (b"\xff", []), (b"", []),
    (b'{"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555", "at": 990, '
     b'"pad": "' + b"x" * 1100 + b'"}', []),  # > 1 KiB
])
async def test_the_other_routers_a_join_names_are_read_as_a_peer_s_message(raw, listed):
    """What etcd holds under routers/ is checked before a joiner is told of it: only
    another router's fresh, well-formed record, one plain TCP endpoint each."""
    from pichat.router.daemon import roster

    class Etcd:
        async def items(self, root):
            assert root == roster.ROOT
            return [("a", raw, 5)], 5

    found = await roster.others(Etcd(), "tcp://10.0.0.1:5556",
                                clock=lambda: roster.STALE_S + 500)
    assert found == listed


async def test_one_token_used_through_both_routers_at_once_lets_one_pi_in(
        keyed, tmp_path: Path):
    """A one-use token, two Pis joining with it at the same moment, one through each
    router: one is in, on both routers; the other is told the token is used."""
    cluster, other, a_keys, b_keys = keyed
    made = parse(pichat("invite", "--keys", str(a_keys), "--address",
                        cluster.join_endpoint).stdout.strip())
    for _ in range(100):  # until B has the invitation (a round of its key ring)
        if list((b_keys / "invites").glob("*.json")):
            break
        await asyncio.sleep(0.05)
    via_b = replace(made, addresses=(other.join_endpoint,))
    joins = [subprocess.Popen([sys.executable, "-m", "pichat", "join", token, "--keys",
                               str(tmp_path / name), "--name", name], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, token in (("pi1", made.token()), ("pi2", via_b.token()))]
    outcomes = [(proc.wait(60), proc.communicate()[1]) for proc in joins]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    assert any("already used" in err for code, err in outcomes if code), outcomes
    names = {"pi1", "pi2"}
    for _ in range(100):
        if all({p.stem for p in (k / "workers").glob("*.key")} & names for k in
               (a_keys, b_keys)):
            break
        await asyncio.sleep(0.05)
    held = [{p.stem for p in (k / "workers").glob("*.key")} & names
            for k in (a_keys, b_keys)]
    assert held[0] == held[1] and len(held[0]) == 1, held
