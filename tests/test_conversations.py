"""Conversations the router keeps (pichat/router/daemon/memory.py): continued with only the new
message, after a router restart and from another client, each owner's own, and the
`pichat conversations` commands. Real router and sim workers on real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from conftest import ROOT, Cluster
from pichat.client import Client
from pichat.config import ClientConfig
from pichat.errors import RequestFailed
from pichat.protocol import ChatMessage, Sampling
from pichat.security import keygen, resolve_keys

pytestmark = pytest.mark.asyncio

GREEDY = Sampling(temperature=0, max_tokens=8)


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


async def test_a_stored_conversation_goes_on_after_a_router_restart_from_another_client(
        cluster: Cluster, tmp_path):
    db = str(tmp_path / "conversations.db")
    router = cluster.router("--db", db)
    cluster.worker("w1", "--sim-reply-tokens", "6")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        first = await c.chat(user("My name is Ada."), sampling=GREEDY, conversation="intro")
        cid = first.done.conversation
        assert cid and first.text
        second = await c.chat(user("I live in Lyon."), sampling=GREEDY, conversation=cid)
        assert second.done.conversation == cid
        # The router sent the history: the worker found it warm (its session is the
        # conversation's) and read only the new message.
        assert second.usage.prompt_tokens > first.usage.prompt_tokens
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
    router.stop()  # SIGTERM: drained and gone
    cluster.router("--db", db)
    await cluster.wait_workers(1)
    async with cluster.client() as other:  # another connection: another client
        listed = await other.conversations("list")
        assert [(c["id"], c["title"], c["messages"]) for c in listed] == [(cid, "intro", 4)]
        third = await other.chat(user("Where do I live?"), sampling=GREEDY,
                                 conversation="intro")  # by its title
        assert third.done.conversation == cid
        assert third.usage.prompt_tokens > second.usage.prompt_tokens
        stored = await other.conversations("get", id=cid)
        assert [(m["role"], m["content"]) for m in stored["messages"]] == [
            ("user", "My name is Ada."), ("assistant", first.text),
            ("user", "I live in Lyon."), ("assistant", second.text),
            ("user", "Where do I live?"), ("assistant", third.text)]
        assert stored["messages"][1]["worker"] == "w1"


async def test_one_owner_cannot_see_or_continue_anothers_conversation(cluster: Cluster,
                                                                        tmp_path):
    keys = tmp_path / "keys"
    keygen(keys, clients=("alice", "mallory"))
    cluster.keys = keys
    cluster.router("--keys", str(keys), "--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--keys", str(keys), "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)

    def as_(name: str) -> Client:
        return Client(ClientConfig(router=cluster.client_endpoint,
                                   keys=resolve_keys(str(keys)), key_name=name))

    async with as_("alice") as alice, as_("mallory") as mallory:
        reply = await alice.chat(user("My PIN is 1234."), sampling=GREEDY,
                                 conversation="bank")
        cid = reply.done.conversation
        assert await mallory.conversations("list") == []
        for op, fields in (("get", {"id": cid}), ("get", {"id": "bank"}),
                           ("delete", {"id": cid}), ("rename", {"id": cid, "title": "x"})):
            with pytest.raises(RequestFailed, match="no conversation"):
                await mallory.conversations(op, **fields)
        # Naming alice's id only starts a conversation of mallory's own under that title.
        theirs = await mallory.chat(user("What is my PIN?"), sampling=GREEDY,
                                    conversation=cid)
        assert theirs.done.conversation != cid
        assert theirs.usage.prompt_tokens < reply.usage.prompt_tokens + 5
        mine = await alice.conversations("get", id=cid)
        assert mine["total"] == 2 and mine["title"] == "bank"


async def test_turns_of_one_conversation_go_one_at_a_time(cluster: Cluster, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--sim-reply-tokens", "400", "--sim-gen-tps", "200", "--slots", "2")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        first = asyncio.ensure_future(c.chat(user("a long one"), conversation="solo"))
        while not (await c.status())["requests"].get("active"):
            await asyncio.sleep(0.01)
        with pytest.raises(RequestFailed, match="still being answered"):
            await c.chat(user("meanwhile"), conversation="solo")
        assert (await first).done.conversation
        again = await c.chat(user("now"), sampling=GREEDY, conversation="solo")
        assert (await c.conversations("get", id=again.done.conversation))["total"] == 4


async def test_a_flood_of_questions_is_answered_or_refused_and_the_router_serves_on(
        cluster: Cluster, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        await c.chat(user("keep me"), sampling=GREEDY, conversation="kept")
        outcomes = await asyncio.gather(
            *[c.conversations("get", id="kept") for _ in range(600)],
            *[c.conversations("get", id=f"missing-{i}") for i in range(200)],
            return_exceptions=True)
        got = [o for o in outcomes[:600] if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, RequestFailed)]
        assert len(got) + len(refused) == 800  # every one answered, one way or the other
        assert all(o["total"] == 2 for o in got)
        assert {str(e.code) for e in refused} <= {"busy", "bad_request"}
        assert sum(isinstance(o, RequestFailed) and o.code == "bad_request"
                   for o in outcomes[600:]) + sum(isinstance(o, RequestFailed) and
                                                  o.code == "busy"
                                                  for o in outcomes[600:]) == 200
        assert (await c.chat(user("still there?"), sampling=GREEDY,
                             conversation="kept")).done.conversation


async def test_a_router_without_a_store_says_so(cluster: Cluster):
    cluster.router("--db", "off")
    cluster.worker("w1")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        with pytest.raises(RequestFailed, match="keeps no conversations"):
            await c.chat(user("hi"), conversation="x")
        with pytest.raises(RequestFailed, match="keeps no conversations"):
            await c.conversations("list")
        assert (await c.chat(user("hi"), sampling=GREEDY)).text  # the rest works


async def test_the_http_routes_keep_and_continue_a_conversation(cluster: Cluster, tmp_path):
    keys = tmp_path / "api-keys"
    keys.write_text("key-ann\nkey-bob\n")
    cluster.router("--db", str(tmp_path / "c.db"), "--api-key-file", str(keys))
    cluster.worker("w1", "--sim-reply-tokens", "5")
    await cluster.wait_workers(1)
    base = f"{cluster.http_url}/v1/conversations"
    ann = {"Authorization": "Bearer key-ann"}
    bob = {"Authorization": "Bearer key-bob"}
    async with aiohttp.ClientSession() as http:
        async with http.post(base, json={"title": "web"}, headers=ann) as r:
            assert r.status == 201
            cid = (await r.json())["id"]
        turn = {"content": "Hello there", "max_tokens": 8, "temperature": 0}
        async with http.post(f"{base}/{cid}/messages", json=turn, headers=ann) as r:
            first = await r.json()
        assert first["object"] == "chat.completion"
        assert first["pichat"]["conversation"] == cid
        answer = first["choices"][0]["message"]["content"]
        streamed = {**turn, "content": "And again", "stream": True}
        async with http.post(f"{base}/{cid}/messages", json=streamed, headers=ann) as r:
            events = [line for line in (await r.text()).splitlines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][5:])
        assert last["pichat"]["conversation"] == cid
        async with http.get(f"{base}/{cid}?offset=1&limit=2", headers=ann) as r:
            page = await r.json()
        assert page["total"] == 4 and [m["content"] for m in page["messages"]] == [
            answer, "And again"]
        async with http.get(base, headers=bob) as r:
            assert (await r.json())["data"] == []
        for method in ("get", "delete", "patch"):
            async with http.request(method, f"{base}/{cid}", json={"title": "x"},
                                    headers=bob) as r:
                assert r.status == 404, method
        async with http.patch(f"{base}/{cid}", json={"title": "renamed"}, headers=ann) as r:
            assert (await r.json())["title"] == "renamed"
        async with http.get(base, headers=ann) as r:
            assert [(c["title"], c["messages"]) for c in (await r.json())["data"]] == [
                ("renamed", 4)]
        for method, url, body, param in (
                ("post", f"{base}/{cid}/messages", {"max_tokens": 8}, "content"),
                ("post", base, {"title": "x" * 201}, "title"),
                ("get", f"{base}?limit=0", None, None),
                ("get", f"{base}?offset=minus", None, None)):
            async with http.request(method, url, json=body, headers=ann) as r:
                assert r.status == 400, url
                assert (await r.json())["error"]["param"] == param
        async with http.delete(f"{base}/{cid}", headers=ann) as r:
            assert (await r.json())["deleted"] is True
        async with http.get(f"{base}/{cid}", headers=ann) as r:
            assert r.status == 404


def pichat(cluster: Cluster, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pichat", *args, "--router",
                           cluster.client_endpoint], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PICHAT_KEYS": "off"})
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_the_conversations_commands(cluster: Cluster, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        reply = await c.chat(user("Plan a trip to Oslo."), sampling=GREEDY,
                             conversation="trip")
    cid = reply.done.conversation
    assert f"{cid}" in pichat(cluster, "conversations", "list")
    exported = json.loads(pichat(cluster, "conversations", "export", "trip"))
    assert [m["content"] for m in exported["messages"]] == ["Plan a trip to Oslo.", reply.text]
    markdown = pichat(cluster, "conversations", "export", cid, "--format", "markdown")
    assert markdown.startswith("# trip") and "Plan a trip to Oslo." in markdown
    assert "Oslo 2027" in pichat(cluster, "conversations", "rename", cid, "Oslo 2027")
    assert "Oslo 2027" in pichat(cluster, "conversations", "show", cid)
    assert f"deleted {cid}" in pichat(cluster, "conversations", "delete", "Oslo 2027")
    assert "no stored conversations" in pichat(cluster, "conversations", "list")


async def test_a_conversation_longer_than_the_context_slides_and_keeps_hitting_the_cache(
        cluster: Cluster, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--ctx", "1024", "--sim-reply-tokens", "20", "--sim-gen-tps", "2000",
                   "--sim-prompt-tps", "50000")
    await cluster.wait_workers(1)
    rows = []
    async with cluster.client() as c:
        for turn in range(60):  # ~36 tokens a turn: ~2,200 tokens in all
            reply = await c.chat(user(f"turn {turn} " + "word " * 10),
                                 sampling=Sampling(temperature=0, max_tokens=20),
                                 conversation="long")
            u = reply.usage
            rows.append((u.prompt_tokens, u.cached_tokens, u.dropped_tokens))
        stored = await c.conversations("get", id="long", limit=1000)
    assert stored["total"] == 120  # the store keeps everything; the worker read a window
    assert all(prompt + 20 <= 1024 for prompt, _, _ in rows)
    sliding = [r for r in rows if r[2]]
    assert len(sliding) >= 25 and rows[0][2] == 0
    # Between two slides the kept start holds still: the turn reads only what is new.
    moved = [b for a, b in zip(rows, rows[1:]) if b[2] != a[2]]
    between = [r for r in sliding if r not in moved]
    assert all(r[1] >= r[0] - 40 for r in between), rows
    # At a slide the kept turns' cells are moved, not read again (context shift): most of
    # the prompt is still cached (the note is written first and may leave less room).
    assert moved and all(r[1] >= r[0] / 2 for r in moved), rows
    assert len(moved) <= 8  # it moved a block at a time, not every turn
    # A note of what slid out was written and kept with the conversation, standing for
    # the oldest messages (whole turns).
    assert stored["memory"] and 0 < stored["remembered"] < 120
    assert stored["remembered"] % 2 == 0


async def test_a_client_can_ask_for_an_error_instead_of_a_slide(cluster: Cluster):
    cluster.router()
    cluster.worker("w1", "--ctx", "256", "--sim-reply-tokens", "4")
    await cluster.wait_workers(1)
    history = []
    for t in range(12):
        history += [{"role": "user", "content": f"q{t} " + "w " * 20},
                    {"role": "assistant", "content": "a " * 10}]
    history.append({"role": "user", "content": "and?"})
    url = f"{cluster.http_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"messages": history, "max_tokens": 16}) as r:
            body = await r.json()
            assert r.status == 200 and body["pichat"]["dropped_tokens"] > 0
        async with http.post(url, json={"messages": history, "max_tokens": 16,
                                         "truncate": False}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["code"] == "context_length_exceeded"
        async with http.post(url, json={"messages": history, "truncate": "no"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "truncate"


async def test_a_stored_conversation_longer_than_a_request_may_be_still_goes_on(
        cluster: Cluster, tmp_path):
    cluster.router("--db", str(tmp_path / "c.db"), "--max-prompt-chars", "3000")
    cluster.worker("w1", "--sim-reply-tokens", "8", "--sim-gen-tps", "2000")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        for turn in range(20):  # ~330 characters a turn: 6,600 in all
            reply = await c.chat(user(f"turn {turn} " + "word " * 60), sampling=GREEDY,
                                 conversation="big")
            assert reply.text
        stored = await c.conversations("get", id="big", limit=1000)
    assert stored["total"] == 40  # all kept; each request carried what fits
    # A request of its own that size is still refused, as before.
    async with cluster.client() as c:
        with pytest.raises(RequestFailed, match="3000"):
            await c.chat(user("x " * 2000), sampling=GREEDY)


async def test_a_stored_conversation_of_more_messages_than_a_request_carries_goes_on(
        cluster: Cluster, tmp_path):
    """The store keeps up to 5,000 messages; a request carries at most 4,096: a longer
    conversation is sent as its newest whole turns that fit, and every turn is answered."""
    import sqlite3

    from pichat.memory.sqlite import SQLiteStore
    from pichat.memory.store import Message
    from pichat.protocol import MAX_MESSAGES

    db = str(tmp_path / "c.db")
    router = cluster.router("--db", db)
    cluster.worker("w1", "--sim-reply-tokens", "4", "--slots", "1", "--sim-prompt-tps", "1e6")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        first = await c.chat(user("start"), sampling=GREEDY, conversation="long")
    router.stop()
    with sqlite3.connect(db) as raw:
        (owner,), = raw.execute("SELECT owner FROM conversations").fetchall()
    store = await SQLiteStore.open(db)
    try:
        turns = (MAX_MESSAGES + 200) // 2
        for start in range(0, turns, 500):
            await store.append(owner, first.done.conversation, tuple(
                m for i in range(start, min(turns, start + 500))
                for m in (Message("user", f"question {i}"), Message("assistant", f"answer {i}"))))
    finally:
        await store.close()
    cluster.router("--db", db)
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        reply = await c.chat(user("and the next?"), sampling=GREEDY, conversation="long")
        assert reply.text and reply.done.conversation == first.done.conversation
        stored = await c.conversations("get", id="long", limit=1)
    assert stored["total"] == 2 + 2 * turns + 2


GARDEN = [
    "What vegetables are easy to grow?", "When should I plant tomatoes?",
    "How often should I water lettuce?", "What is compost?", "How do I make compost?",
    "Why are my tomato leaves yellow?", "What is mulch for?", "How deep do I plant carrots?",
    "Which herbs grow well in pots?", "How do I keep slugs away?", "What is crop rotation?",
    "When do I harvest potatoes?", "How much sun do peppers need?", "What is a raised bed?",
    "How do I grow basil from seed?", "What soil do strawberries like?",
    "How do I prune a rose?", "What are cover crops?", "How do I save seeds?",
    "Why do my seedlings fall over?", "What is companion planting?",
    "How do I grow garlic?", "When should I sow beans?", "How do I attract bees?",
    "What is a good fertilizer for leafy greens?", "How do I stop weeds?",
    "Can I grow lemons in a pot?", "What is the best time to water?",
    "How do I grow cucumbers on a trellis?",
]
ON_TOPIC = ("plant", "soil", "water", "grow", "seed", "garden", "leaf", "leaves", "root",
            "compost", "sun", "tomato", "harvest", "flower", "fertiliz", "pot")


@pytest.mark.slow
@pytest.mark.timeout(900)  # 60 answers: ~2 minutes here, several beside two CPU hogs
async def test_forty_turns_on_the_default_model_at_a_small_context_slide_and_remember(
        cluster: Cluster, tmp_path, default_model):
    """A conversation far longer than `--ctx 1024` never fails: it slides, the turns
    between two slides read only what is new, and the note of what slid out keeps the
    user's name from turn 1 to turn 40. The model also titles the conversation."""
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--model", str(default_model), "--ctx", "1024", "--threads", "2",
                   backend="llama")
    await cluster.wait_workers(1, timeout=300)
    first = "Hi! My name is Ada and I live in Lisbon. I have a small vegetable garden."
    detailed = [q.replace("?", ", in more detail?") for q in GARDEN[:9]]
    questions = [first, *GARDEN, *detailed, "What is my name, and where do I live?"]
    assert len(questions) == 40
    rows, answers = [], []
    async with cluster.client(silence_timeout=120) as c:
        made = await c.conversations("create")  # untitled: the model titles it
        for question in questions:
            reply = await c.chat(user(question), conversation=made["id"],
                                 sampling=Sampling(temperature=0, max_tokens=40))
            u = reply.usage
            rows.append((u.prompt_tokens, u.cached_tokens, u.dropped_tokens))
            answers.append(reply.text)
        stored = await c.conversations("get", id=made["id"], limit=1)
        listed = await c.conversations("list")
    assert stored["total"] == 2 * len(questions)
    assert all(prompt + 40 <= 1024 for prompt, _, _ in rows), rows
    assert rows[-1][2] > 1000  # far more than the context slid out
    # Between two slides the kept start is served from the cache.
    steps = [b[2] - a[2] for a, b in zip(rows, rows[1:]) if b[2] != a[2]]
    assert all(step >= 200 for step in steps), rows  # in blocks (a quarter: 256 tokens)
    moved = [b for a, b in zip(rows, rows[1:]) if b[2] != a[2]]
    between = [r for r in rows[1:] if r[2] and r not in moved]
    assert len(between) >= 2 * len(moved), rows
    assert all(cached >= prompt - 100 for prompt, cached, _ in between), rows
    # At a slide the kept turns' cells were moved, not read again.
    assert all(cached >= prompt / 2 for prompt, cached, _ in moved), rows
    # On topic all along, and the name from turn 1 is still known at turn 40.
    on_topic = sum(any(w in a.lower() for w in ON_TOPIC) for a in answers)
    assert on_topic >= 0.75 * len(questions), answers
    assert "ada" in answers[-1].lower(), answers[-1]
    assert "ada" in stored["memory"].lower() and stored["remembered"] >= 20
    # The model's title replaced the excerpt of the first message.
    title = next(c["title"] for c in listed if c["id"] == stored["id"])
    assert title and not first.startswith(title.rstrip("\u2026")), title
    print("title:", title, "| note:", stored["memory"], "| last:", answers[-1])


async def test_two_routers_over_one_postgresql_database_serve_the_same_conversations(
        cluster: Cluster, tmp_path, postgres):
    """Several routers, one store: a conversation begun through one router goes on through
    another (each with its own worker), and a router restart loses nothing."""
    url = postgres.new_database()
    keys = tmp_path / "api-keys"
    keys.write_text("key-ann\nkey-bob\n")
    other = Cluster(tmp_path / "other")
    (tmp_path / "other").mkdir()
    try:
        for c, worker in ((cluster, "w1"), (other, "w2")):
            c.router("--db", url, "--api-key-file", str(keys))
            c.worker(worker, "--sim-reply-tokens", "5")
            await c.wait_workers(1)
        ann = {"Authorization": "Bearer key-ann"}
        turn = {"max_tokens": 8, "temperature": 0}
        one = f"{cluster.http_url}/v1/conversations"
        two = f"{other.http_url}/v1/conversations"
        async with aiohttp.ClientSession() as http:
            async with http.post(one, json={"title": "shared"}, headers=ann) as r:
                cid = (await r.json())["id"]
            async with http.post(f"{one}/{cid}/messages", headers=ann,
                                 json={**turn, "content": "Through the first"}) as r:
                assert (await r.json())["pichat"]["worker"] == "w1"
            async with http.post(f"{two}/{cid}/messages", headers=ann,
                                 json={**turn, "content": "Through the second"}) as r:
                body = await r.json()
                assert body["pichat"]["worker"] == "w2"
                assert body["usage"]["prompt_tokens"] > 8  # the history came with it
            async with http.get(f"{two}/{cid}", headers={"Authorization": "Bearer key-bob"}
                                ) as r:
                assert r.status == 404  # still each owner's own
        cluster.procs[0].stop()  # the first router goes and comes back: nothing lost
        cluster.router("--db", url, "--api-key-file", str(keys))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{one}/{cid}", headers=ann) as r:
                page = await r.json()
        assert [m["content"] for m in page["messages"] if m["role"] == "user"] == [
            "Through the first", "Through the second"]
    finally:
        other.close()


async def test_a_history_is_cut_to_whole_newest_turns_by_characters_count_and_bytes():
    from pichat.router.daemon.memory import _size, _within
    history = [ChatMessage("system", "be brief")] + [
        m for i in range(100) for m in (ChatMessage("user", f"q{i} " + "é" * 500),
                                        ChatMessage("assistant", f"a{i} " + "x" * 500))]
    for limits in ({"chars": 10_000, "count": 10**6, "size": 10**9},
                   {"chars": 10**9, "count": 11, "size": 10**9},
                   {"chars": 10**9, "count": 10**6, "size": 10_000}):  # é is two bytes
        kept, left = _within(history, **limits)
        assert kept[0].role == "system" and kept[1].role == "user"
        assert kept[-1] == history[-1] and left == len(history) - len(kept)
        assert sum(len(m.content) for m in kept) <= limits["chars"]
        assert len(kept) <= limits["count"] and sum(map(_size, kept)) <= limits["size"]
        assert len(kept) >= limits["count"] - 2 or sum(map(_size, kept)) > limits["size"] / 2 \
            or sum(len(m.content) for m in kept) > limits["chars"] / 2  # not cut too far
