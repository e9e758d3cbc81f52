"""The conversation stores (pichat/memory/sqlite.py, and pichat/memory/postgres.py against
a real PostgreSQL server): what they keep, for whom, within which bounds, and that a kill
never costs a committed turn nor damages the database."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
import textwrap

import pytest

from pichat.errors import PichatError
from pichat.memory import open_store
from pichat.memory.etcd import EtcdStore
from pichat.memory.postgres import SCHEMA_VERSION as PG_SCHEMA
from pichat.memory.postgres import PostgresStore
from pichat.memory.sqlite import SCHEMA_VERSION, SQLiteStore
from pichat.memory.store import Conflict, LimitReached, Limits, Message, NewerStore, NotFound

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def opened(tmp_path, **limits) -> SQLiteStore:
    return await SQLiteStore.open(tmp_path / "db" / "conversations.db", Limits(**limits),
                                  clock=Clock())


@pytest.fixture(params=["sqlite", "postgres", "etcd"])
def make(request, tmp_path):
    """An async factory of an empty store of each kind, with these limits."""
    if request.param == "sqlite":
        return lambda **limits: opened(tmp_path, **limits)
    if request.param == "etcd":
        url = request.getfixturevalue("etcd").url + f"/t{secrets.token_hex(6)}/"
        return lambda **limits: EtcdStore.open(url, Limits(**limits), clock=Clock())
    server = request.getfixturevalue("postgres")
    url = server.new_database()
    return lambda **limits: PostgresStore.open(url, Limits(**limits), clock=Clock())


def turn(question: str, answer: str) -> tuple[Message, Message]:
    return Message("user", question), Message("assistant", answer, model="m", worker="w1")


async def test_a_conversation_is_kept_listed_found_renamed_and_deleted(make):
    store = await make()
    try:
        first = await store.create("alice", title="Moon", model="m",
                                   messages=(Message("system", "Be brief."),))
        second = await store.create("alice", title="Mars")
        await store.append("alice", first.id, turn("How far is it?", "384,400 km."))
        got = await store.get("alice", first.id)
        assert [(m.role, m.content) for m in got.messages] == [
            ("system", "Be brief."), ("user", "How far is it?"), ("assistant", "384,400 km.")]
        assert got.messages[2].worker == "w1" and got.messages[1].created > 0
        assert [s.id for s in await store.list("alice")] == [first.id, second.id]  # recent
        assert (await store.list("alice"))[0].messages == 3
        assert (await store.find("alice", "Mars")).id == second.id
        page = await store.get("alice", first.id, offset=1, limit=1)
        assert [m.content for m in page.messages] == ["How far is it?"] and page.total == 3
        assert await store.find("alice", "Venus") is None
        await store.rename("alice", second.id, "Red planet")
        assert (await store.get("alice", second.id)).title == "Red planet"
        await store.remember("alice", first.id, "The user asked about the Moon.", 2)
        got = await store.get("alice", first.id)
        assert (got.memory, got.remembered) == ("The user asked about the Moon.", 2)
        assert await store.delete("alice", second.id)
        assert not await store.delete("alice", second.id)
        with pytest.raises(NotFound):
            await store.get("alice", second.id)
    finally:
        await store.close()


async def test_one_owner_never_reaches_another_owners_conversation(make):
    store = await make()
    try:
        mine = await store.create("alice", title="secret",
                                  messages=turn("My PIN is 1234", "Noted."))
        assert await store.list("mallory") == []
        assert await store.find("mallory", "secret") is None
        for call in (store.get("mallory", mine.id),
                     store.append("mallory", mine.id, turn("and?", "...")),
                     store.rename("mallory", mine.id, "mine now"),
                     store.remember("mallory", mine.id, "x", 1)):
            with pytest.raises(NotFound):
                await call
        assert not await store.delete("mallory", mine.id)
        kept = await store.get("alice", mine.id)
        assert (kept.title, len(kept.messages)) == ("secret", 2)
    finally:
        await store.close()


async def test_a_turn_on_a_history_that_moved_on_is_refused_not_forked(make):
    # Two routers answered a turn of one conversation at once: the second to finish
    # finds the history longer than when its turn began.
    store = await make()
    try:
        c = await store.create("alice", messages=turn("q0", "a0"))
        await store.append("alice", c.id, turn("q1", "a1"), after=2)
        with pytest.raises(Conflict, match="continued elsewhere.*not kept"):
            await store.append("alice", c.id, turn("q1'", "a1'"), after=2)
        await store.append("alice", c.id, turn("q2", "a2"))  # no expectation: appended
        assert [m.content for m in (await store.get("alice", c.id)).messages] == [
            "q0", "a0", "q1", "a1", "q2", "a2"]
    finally:
        await store.close()


async def test_limits_refuse_with_a_clear_error_and_store_nothing(make):
    store = await make(conversations_per_owner=2, messages_per_conversation=4,
                       message_chars=100)
    try:
        c = await store.create("alice", messages=turn("a", "b"))
        await store.create("alice")
        with pytest.raises(LimitReached, match="delete some"):
            await store.create("alice")
        await store.create("bob")  # another owner's count is its own
        with pytest.raises(LimitReached, match="at most 4"):
            await store.append("alice", c.id, turn("c", "d") + turn("e", "f"))
        with pytest.raises(LimitReached, match="100"):
            await store.append("alice", c.id, (Message("user", "x" * 101),))
        with pytest.raises(LimitReached, match="role"):
            await store.append("alice", c.id, (Message("robot", "x"),))
        assert len((await store.get("alice", c.id)).messages) == 2  # nothing of those
    finally:
        await store.close()


async def test_past_its_byte_bound_the_store_drops_the_least_recently_used(make):
    # 10 KB in all, 5 KB per owner: ~1 KB per conversation of one 900-character message.
    store = await make(max_bytes=10_000, owner_share=0.5)
    try:
        big = "x" * 900
        others = [await store.create(f"user{i}", messages=(Message("user", big),))
                  for i in range(4)]
        alices = [await store.create("alice", messages=(Message("user", big),))
                  for _ in range(6)]
        # alice is over her share: her oldest went, nobody else's.
        assert [s.id for s in await store.list("alice")] == [c.id for c in alices[1:]][::-1]
        assert all([await store.list(f"user{i}") for i in range(4)])
        for i in range(4):  # now the store: the least recently used of anyone's
            await store.create(f"late{i}", messages=(Message("user", big),))
        assert [bool(await store.list(f"user{i}")) for i in range(4)] == [
            False, False, False, True]
        assert all([await store.list(f"late{i}") for i in range(4)])
        assert len(await store.list("alice")) == 5
        assert store.dropped == 4
        with pytest.raises(LimitReached, match="too large"):  # one bigger than a share
            await store.append("alice", alices[-1].id,
                               tuple(Message("user", big) for _ in range(5)))
        assert len(others) == 4
    finally:
        await store.close()


async def test_a_restart_keeps_every_turn_and_the_file_is_private(tmp_path):
    store = await opened(tmp_path)
    c = await store.create("alice", title="t", messages=turn("q", "a"))
    await store.append("alice", c.id, turn("q2", "a2"))
    await store.close()
    path = tmp_path / "db" / "conversations.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = await opened(tmp_path)
    try:
        assert [m.content for m in (await store.get("alice", c.id)).messages] == [
            "q", "a", "q2", "a2"]
    finally:
        await store.close()


async def test_a_database_from_a_newer_pichat_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "db" / "conversations.db"
    store = await opened(tmp_path)
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(NewerStore, match="newer pichat"):
        await SQLiteStore.open(path)
    assert path.read_bytes() == before


async def test_a_store_that_cannot_be_opened_says_where_and_what_to_do(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PichatError, match="cannot open the conversation store.*--db off"):
        await SQLiteStore.open(blocker / "conversations.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(PichatError, match="cannot open the conversation store"):
        await SQLiteStore.open(tmp_path / "junk.db")


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pichat.memory import open_store
    from pichat.memory.store import Message

    async def main():
        store = await open_store(sys.argv[1])
        c = await store.create("alice")
        print(c.id, flush=True)
        n = 0
        while True:
            await store.append("alice", c.id, (Message("user", f"q{n} " + "x" * 2000),
                                               Message("assistant", f"a{n}")))
            n += 1
            print(n, flush=True)   # stored: the transaction committed

    asyncio.run(main())
""")


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "etcd"])
async def test_a_kill_mid_write_loses_no_committed_turn_and_leaves_the_file_whole(
        tmp_path, request, kind):
    if kind == "sqlite":
        where = str(tmp_path / "conversations.db")
    elif kind == "etcd":
        where = request.getfixturevalue("etcd").url + f"/t{secrets.token_hex(6)}/"
    else:
        where = request.getfixturevalue("postgres").new_database()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, where], stdout=subprocess.PIPE,
                            text=True)
    try:
        cid = proc.stdout.readline().strip()
        acked = 0
        while acked < 40:  # killed while it keeps writing, at no chosen point
            acked = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if kind == "sqlite":
        with sqlite3.connect(where) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = await open_store(where)
    try:
        messages = (await store.get("alice", cid)).messages
        assert len(messages) >= 2 * acked and len(messages) % 2 == 0  # whole turns only
        assert [m.content[:4].strip() for m in messages[1::2]] == [
            f"a{i}" for i in range(len(messages) // 2)]
        (listed,) = await store.list("alice")
        assert listed.messages == len(messages)
        await store.append("alice", cid, turn("after", "the kill"))  # and it goes on
    finally:
        await store.close()


async def test_postgres_from_a_newer_pichat_is_refused_and_a_bad_url_says_what_to_do(
        postgres):
    import psycopg

    url = postgres.new_database()
    store = await PostgresStore.open(url)
    c = await store.create("alice", messages=turn("q", "a"))
    await store.close()
    again = await PostgresStore.open(url)  # reopened: migrated once, the turn still there
    assert len((await again.get("alice", c.id)).messages) == 2
    await again.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pichat_schema SET version = version + 1")
    with pytest.raises(NewerStore, match="newer pichat"):
        await PostgresStore.open(url)
    with psycopg.connect(url) as conn:  # left alone
        assert conn.execute("SELECT version FROM pichat_schema").fetchone()[0] == \
            PG_SCHEMA + 1
        assert conn.execute("SELECT count(*) FROM pichat_messages").fetchone()[0] == 2
    secret = url.replace("postgres@", "postgres:hunter2@")
    bad = secret.rsplit("?", 1)[0] + "?host=/nonexistent/socket"
    with pytest.raises(PichatError, match="cannot (open|reach) the conversation store") as err:
        await PostgresStore.open(bad)
    assert "hunter2" not in str(err.value) and "--db" in str(err.value)


async def test_etcd_keeps_every_acknowledged_turn_when_a_member_dies_mid_load(tmp_path):
    # Three members (two routers' Pis and a witness): the leader SIGKILLed while two
    # writers (two routers) append turns; each goes on through the survivors, and every
    # turn either acknowledged is there, once, in order.
    from etcd import EtcdCluster

    cluster, why = EtcdCluster.start(3)
    if cluster is None:
        pytest.skip(why)
    stores = []
    try:
        lead = cluster.leader()  # first in the list: the member both stores talk to
        order = [lead, *(i for i in range(3) if i != lead)]
        url = "etcd://" + ",".join(cluster.clients[i].removeprefix("http://")
                                   for i in order) + "/ha/"
        a, b = await open_store(url), await open_store(url)
        stores.extend((a, b))
        c = await a.create("alice")
        acked: list[str] = []

        async def writer(store, name: str) -> None:
            for i in range(30):
                await store.append("alice", c.id, turn(f"{name}{i}", f"answer {name}{i}"))
                acked.append(f"{name}{i}")
                if len(acked) == 20:
                    cluster.kill(lead)

        await asyncio.gather(writer(a, "a"), writer(b, "b"))
        got = (await b.get("alice", c.id)).messages
        questions = [m.content for m in got[0::2]]
        assert sorted(questions) == sorted(acked) and len(acked) == 60
        assert [m.content for m in got[1::2]] == [f"answer {q}" for q in questions]
        for name in "ab":  # each writer's own turns in its order
            mine = [q for q in questions if q.startswith(name)]
            assert mine == [f"{name}{i}" for i in range(30)]
        (listed,) = await a.list("alice")
        assert listed.messages == 120
    finally:
        for store in stores:  # closed even when it fails (else an unclosed session's
            await store.close()  # warning fails whichever test runs when it is collected)
        cluster.stop()


class LosingAnswers(EtcdStore):
    """An etcd store whose every first try of a write loses its answer after etcd did it
    (a member that committed and then died, or a reply slower than the try's timeout)."""

    async def _post(self, url, body, timeout):
        status, answer = await super()._post(url, body, timeout)
        if url.endswith("/kv/txn"):
            self.lost = getattr(self, "lost", 0) + 1
            if self.lost % 2:
                raise TimeoutError("the answer was lost")
        return status, answer


async def test_etcd_writes_whose_answer_was_lost_are_done_once(etcd):
    url = etcd.url + f"/t{secrets.token_hex(6)}/"
    store = await LosingAnswers.open(url)
    try:
        c = await store.create("alice", messages=turn("q0", "a0"))
        await store.append("alice", c.id, turn("q1", "a1"), after=2)  # no Conflict
        await store.append("alice", c.id, turn("q2", "a2"))
        await store.rename("alice", c.id, "once")
        assert [m.content for m in (await store.get("alice", c.id)).messages] == [
            "q0", "a0", "q1", "a1", "q2", "a2"]
        assert [(s.title, s.messages) for s in await store.list("alice")] == [("once", 6)]
        assert await store.delete("alice", c.id)
        assert await store.list("alice") == []
        assert store.lost >= 10  # every write's answer was lost once
    finally:
        await store.close()


async def test_etcd_a_lost_answer_then_another_routers_turn_is_still_done_once(etcd):
    # b's append commits, its answer is lost, and a's append lands before b reads again:
    # b must still find its own write (not only the last one) and not add it twice.
    url = etcd.url + f"/t{secrets.token_hex(6)}/"
    a = await EtcdStore.open(url)
    c = await a.create("alice")

    class Interleaved(EtcdStore):
        pending = True

        async def _post(self, url, body, timeout):
            status, answer = await super()._post(url, body, timeout)
            if url.endswith("/kv/txn") and self.pending:
                self.pending = False
                await a.append("alice", c.id, turn("from a", "answer a"))
                raise TimeoutError("the answer was lost")
            return status, answer

    b = await Interleaved.open(url)
    try:
        await b.append("alice", c.id, turn("from b", "answer b"))
        assert [m.content for m in (await b.get("alice", c.id)).messages] == [
            "from b", "answer b", "from a", "answer a"]
    finally:
        await a.close()
        await b.close()


async def test_etcd_that_cannot_be_reached_says_so_and_a_newer_layout_is_refused(etcd):
    import base64

    import msgpack

    url = etcd.url + f"/t{secrets.token_hex(6)}/"
    store = await EtcdStore.open(url)
    await store.create("alice", messages=turn("q", "a"))
    await store.close()
    etcd.call(0, "kv/put", {"key": base64.b64encode(store.prefix + b"schema").decode(),
                            "value": base64.b64encode(msgpack.packb(99)).decode()})
    with pytest.raises(NewerStore, match="newer pichat"):
        await EtcdStore.open(url)
    with pytest.raises(PichatError, match="cannot open the conversation store.*--db"):
        await EtcdStore.open("etcd://127.0.0.1:9,127.0.0.1:7/x/", timeout=1.0)  # nobody
