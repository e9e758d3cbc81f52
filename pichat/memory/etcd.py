"""The conversation store in etcd (`--db etcd://HOST:2379,HOST:2379,HOST:2379`), for two or
three routers that must all survive any one host's death: the same `Store` as
pichat/memory/sqlite.py, the same bounds, kept by etcd's Raft (three members: a router
Pi each and a witness on a worker Pi; any one may die). It speaks etcd's v3 JSON gateway
over aiohttp, trying each member in turn.

Keys, under the URL's path (default `/pichat/`):

    schema                      the layout's version
    c/ID                        a conversation: its owner, title, counts, memory, the
                                request ids of its last turns (msgpack)
    m/ID/SEQ                    its messages, SEQ 8 digits from 0
    o/OWNER/ID                  the owner's index: updated, bytes, title (OWNER: sha256 hex)

A write is one etcd transaction that commits only if the conversation is as it was read
(its key's mod revision), so two routers appending at once serialize, and a turn begun on a
history another router has since extended fails with `Conflict` instead of making the
history diverge (`append(after=N)`). Reads are linearizable: a router cut off from the
majority of members can neither read nor write (it says so); it never serves a stale or
forked history. A transaction holds at most `_BATCH_OPS` operations and `_BATCH_BYTES`
bytes (etcd's defaults are 128 and 1.5 MiB): a bigger create or append is written as
several, each whole. The store-wide byte bound is enforced by the write that finds it
passed (every owner's index is read once per `_SCAN_EVERY` of the bound written).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgpack

from pichat.errors import PichatError
from pichat.memory.store import (
    Conversation,
    Limits,
    Message,
    NewerStore,
    NotFound,
    Summary,
    check_after,
    check_count,
    measure,
    victims,
)

__all__ = ["EtcdStore", "SCHEMA_VERSION", "is_etcd"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_BATCH_OPS = 100
_BATCH_BYTES = 1 << 20
_TRIES = 8
"""Transactions retried when another router wrote the conversation first."""
_TOKENS = 32
"""Writes of a conversation remembered by their tokens (a retried one is not done twice)."""
_SCAN_EVERY = 1 / 64
_UNREACHABLE = (408, 429, 500, 502, 503, 504)


def is_etcd(db: str) -> bool:
    return db.startswith("etcd://")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _end(prefix: bytes) -> bytes:
    """The range end covering every key starting with `prefix`."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _put(key: bytes, value: Any) -> dict:
    return {"request_put": {"key": _b64(key), "value": _b64(msgpack.packb(value))}}


class EtcdStore:
    """A `pichat.memory.store.Store` in an etcd cluster. Make it with `await
    EtcdStore.open(url)`."""

    def __init__(self, url: str, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
        if not hosts:
            raise PichatError(f"--db {url}: name at least one etcd member "
                              "(etcd://HOST:2379,HOST:2379,...)")
        self.members = [f"http://{h if ':' in h else h + ':2379'}" for h in hosts]
        root = (parts.path or "/pichat/").rstrip("/") + "/"
        self.prefix = root.encode()
        self.path = f"etcd://{','.join(hosts)}{root}"
        """Where it is, as shown."""
        self.limits = limits or Limits()
        self.clock = clock
        self.timeout = timeout
        """How long a call may try (every member, through an election) before it fails."""
        self.dropped = 0
        self._current = 0
        self._written = 0
        self._session: Any = None

    @classmethod
    async def open(cls, url: str, limits: Limits | None = None,
                   clock: Callable[[], float] = time.time, timeout: float = 10.0
                   ) -> EtcdStore:
        import aiohttp

        store = cls(url, limits, clock, timeout)
        store._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0))
        try:
            await store._migrate()
        except PichatError as exc:
            await store.close()
            if isinstance(exc, NewerStore):
                raise
            raise PichatError(f"cannot open the conversation store {store.path}: {exc} "
                              "(--db another URL, or --db off for none)") from None
        except BaseException:
            await store.close()
            raise
        return store

    # --- etcd's gateway -----------------------------------------------------------------

    async def _call(self, path: str, body: dict) -> dict:
        """POST `body` to `/v3/PATH` of a member that answers: the member last used first,
        then the others, until `timeout` (an election takes a second or two). A call whose
        answer was lost may have been done: every write is made so that doing it twice
        is doing it once (`_update`)."""
        import aiohttp

        deadline = time.monotonic() + self.timeout
        why = "no member answered"
        while True:
            for _ in range(len(self.members)):
                member = self.members[self._current]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PichatError(f"the conversation store {self.path} cannot be "
                                      f"reached ({why})")
                try:
                    status, answer = await self._post(f"{member}/v3/{path}", body,
                                                      min(3.0, left))
                    if status == 200 and isinstance(answer, dict):
                        return answer
                    message = (answer.get("message") or answer.get("error") or ""
                               if isinstance(answer, dict) else "")
                    if status not in _UNREACHABLE:
                        raise PichatError(f"the conversation store refused a call: "
                                          f"{str(message)[:200]}")
                    why = f"{member}: {str(message)[:200] or status}"
                except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                    why = f"{member}: {type(exc).__name__}"
                self._current = (self._current + 1) % len(self.members)
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _post(self, url: str, body: dict, timeout: float) -> tuple[int, Any]:
        import aiohttp

        async with self._session.post(url, json=body,
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def _range(self, key: bytes, end: bytes | None = None, **options: Any
                     ) -> list[tuple[bytes, Any, int]]:
        """(key, value, mod revision) of each key in [key, end) (or just `key`)."""
        body: dict[str, Any] = {"key": _b64(key), **options}
        if end is not None:
            body["range_end"] = _b64(end)
        answer = await self._call("kv/range", body)
        out = []
        for kv in answer.get("kvs", ()):
            raw = base64.b64decode(kv.get("value", ""))
            value = msgpack.unpackb(raw) if raw else None
            out.append((base64.b64decode(kv["key"]), value, int(kv.get("mod_revision", 0))))
        return out

    async def _txn(self, compare: list[dict], success: list[dict]) -> bool:
        answer = await self._call("kv/txn", {"compare": compare, "success": success})
        return bool(answer.get("succeeded"))

    def _key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    def _owner(self, owner: str) -> str:
        return hashlib.sha256(owner.encode()).hexdigest()[:32]

    # --- the layout -------------------------------------------------------------------

    async def _migrate(self) -> None:
        key = self._key("schema")
        found = await self._range(key)
        version = found[0][1] if found else 0
        if not isinstance(version, int):
            raise PichatError(f"{key.decode()} holds no schema version: is this prefix "
                              "another program's?")
        if version > SCHEMA_VERSION:
            raise NewerStore(
                f"{self.path} was written by a newer pichat (schema {version}; this one "
                f"knows {SCHEMA_VERSION}): upgrade pichat, or give --db another prefix")
        if version < SCHEMA_VERSION:
            # Two routers starting together: the one whose write lands first wins; the
            # other sees the same version.
            absent = [{"target": "VERSION", "key": _b64(key), "version": "0",
                       "result": "EQUAL"}]
            await self._txn(absent if not found else [], [_put(key, SCHEMA_VERSION)])
            log.info("conversation store %s: schema %d", self.path, SCHEMA_VERSION)

    async def _meta(self, owner: str, cid: str) -> tuple[dict, int]:
        """The conversation's record and its mod revision; NotFound if it is not the
        owner's."""
        if not cid or "/" in cid or len(cid) > 64:
            raise NotFound(f"no conversation {cid[:40]!r} of yours")
        found = await self._range(self._key("c", cid))
        if not found or not isinstance(found[0][1], dict) or found[0][1].get("owner") != owner:
            raise NotFound(f"no conversation {cid[:40]!r} of yours")
        return found[0][1], found[0][2]

    def _writes(self, cid: str, meta: dict) -> list[dict]:
        return [_put(self._key("c", cid), meta),
                _put(self._key("o", self._owner(meta["owner"]), cid),
                     [meta["updated"], meta["bytes"], meta["title"]])]

    def _messages(self, cid: str, n: int, messages: tuple[Message, ...]) -> list[dict]:
        now = self.clock()
        return [_put(self._key("m", cid, f"{n + i:08d}"),
                     [m.role, m.content, m.created or now, m.model[:200], m.worker[:200]])
                for i, m in enumerate(messages)]

    async def _update(self, owner: str, cid: str, change: Callable[[dict], list[dict]]
                      ) -> dict:
        """Read the conversation, have `change(meta)` edit it (returning the other writes
        to make with it), and commit both only if nobody wrote it meanwhile (read again and
        retried if somebody did). The record keeps the tokens of its last `_TOKENS` writes:
        a write whose answer was lost, found done when read again (even after another
        router's), is not done twice."""
        token = secrets.token_hex(8)
        for _ in range(_TRIES):
            meta, revision = await self._meta(owner, cid)
            done = list(meta.get("w") or ())
            if token in done:
                return meta
            more = change(meta)
            meta["w"] = [*done[-(_TOKENS - 1):], token]
            ops = [*more, *self._writes(cid, meta)]
            if await self._txn([{"target": "MOD", "key": _b64(self._key("c", cid)),
                                 "mod_revision": str(revision), "result": "EQUAL"}], ops):
                return meta
        raise PichatError(f"conversation {cid}: too many routers writing it at once")

    # --- the Store interface ----------------------------------------------------------

    async def create(self, owner: str, *, title: str = "", model: str = "",
                     messages: tuple[Message, ...] = ()) -> Conversation:
        check_count(await self._count(self._key("o", self._owner(owner), "")), self.limits)
        measure(messages, self.limits, 0, 0)  # all of them, before anything is written
        cid = secrets.token_hex(8)
        now = self.clock()
        meta = {"owner": owner, "title": title[:200], "model": model[:200], "created": now,
                "updated": now, "n": 0, "bytes": 0, "memory": "", "remembered": 0,
                "w": [secrets.token_hex(8)]}
        first, rest = self._batches(messages)
        meta["n"] = len(first)
        meta["bytes"] = measure(first, self.limits, 0, 0)
        key = self._key("c", cid)
        if not await self._txn([{"target": "CREATE", "key": _b64(key),
                                 "create_revision": "0", "result": "EQUAL"}],
                               [*self._messages(cid, 0, first), *self._writes(cid, meta)]):
            found = await self._range(key)  # made by this very call, its answer lost?
            if not found or not isinstance(found[0][1], dict) or \
                    found[0][1].get("w", [None])[:1] != meta["w"]:
                raise PichatError("a new conversation's id was taken: try again")
        self._written += sum(len(m.content) for m in first)
        for batch in rest:
            await self.append(owner, cid, batch)
        await self._bound(owner, cid)
        return await self.get(owner, cid)

    async def _count(self, prefix: bytes) -> int:
        answer = await self._call("kv/range", {"key": _b64(prefix),
                                               "range_end": _b64(_end(prefix)),
                                               "count_only": True})
        return int(answer.get("count", 0))

    def _batches(self, messages: tuple[Message, ...]
                 ) -> tuple[tuple[Message, ...], list[tuple[Message, ...]]]:
        """`messages` in runs that fit one transaction each (the first, and the rest)."""
        runs: list[tuple[Message, ...]] = []
        run: list[Message] = []
        size = 0
        for m in messages:
            cost = len(m.content.encode()) + 256
            if run and (len(run) >= _BATCH_OPS - 4 or size + cost > _BATCH_BYTES):
                runs.append(tuple(run))
                run, size = [], 0
            run.append(m)
            size += cost
        if run:
            runs.append(tuple(run))
        return (runs[0] if runs else ()), runs[1:]

    async def get(self, owner: str, conversation: str, offset: int = 0,
                  limit: int | None = None) -> Conversation:
        meta, _ = await self._meta(owner, conversation)
        n = int(meta["n"])
        start = max(0, offset)
        stop = n if limit is None else min(n, start + max(0, limit))
        messages: list[Message] = []
        while start < stop:
            rows = await self._range(self._key("m", conversation, f"{start:08d}"),
                                     self._key("m", conversation, f"{stop:08d}"),
                                     limit=str(min(stop - start, 500)))
            if not rows:
                break
            for key, value, _ in rows:
                try:
                    role, content, created, model, worker = value
                    messages.append(Message(str(role), str(content), float(created),
                                            str(model), str(worker)))
                except (TypeError, ValueError):
                    raise PichatError(f"the conversation store holds a damaged message "
                                      f"({key.decode(errors='replace')[:80]})") from None
            start += len(rows)
        return Conversation(conversation, owner, meta["title"], meta["model"],
                            meta["created"], meta["updated"], tuple(messages),
                            meta["memory"], meta["remembered"], n,
                            tuple(str(t) for t in meta.get("t") or ()))

    async def _index(self, owner: str) -> list[tuple[str, float, int, str]]:
        """The owner's conversations: (id, updated, bytes, title), most recent first."""
        prefix = self._key("o", self._owner(owner), "")
        rows = await self._range(prefix, _end(prefix))
        out = [(key[len(prefix):].decode(), *value) for key, value, _ in rows]
        out.sort(key=lambda row: row[1], reverse=True)
        return out

    async def find(self, owner: str, title: str) -> Conversation | None:
        for cid, _, _, name in await self._index(owner):
            if name == title:
                try:
                    return await self.get(owner, cid, 0, 0)
                except NotFound:  # deleted meanwhile
                    continue
        return None

    async def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[Summary]:
        rows = (await self._index(owner))[max(0, offset):max(0, offset) + max(0, min(limit,
                                                                                    1000))]
        out = []
        for cid, *_ in rows:
            try:
                meta, _ = await self._meta(owner, cid)
            except NotFound:
                continue
            out.append(Summary(cid, meta["title"], meta["model"], meta["created"],
                               meta["updated"], meta["n"]))
        return out

    async def append(self, owner: str, conversation: str, messages: tuple[Message, ...],
                     after: int | None = None, turn: str = "") -> None:
        first, rest = self._batches(messages)
        for batch in (first, *rest) if messages else ():
            def change(meta: dict, batch: tuple[Message, ...] = batch) -> list[dict]:
                n = int(meta["n"])
                if batch is first:
                    check_after(conversation, n, after)
                    if turn:
                        meta["t"] = [*list(meta.get("t") or ())[-(_TOKENS - 1):], turn[:64]]
                meta["bytes"] = int(meta["bytes"]) + measure(batch, self.limits, n,
                                                             int(meta["bytes"]))
                meta["n"] = n + len(batch)
                meta["updated"] = self.clock()
                return self._messages(conversation, n, batch)

            await self._update(owner, conversation, change)
            self._written += sum(len(m.content) for m in batch)
        await self._bound(owner, conversation)

    async def rename(self, owner: str, conversation: str, title: str) -> None:
        def change(meta: dict) -> list[dict]:
            meta["title"] = title[:200]
            return []

        await self._update(owner, conversation, change)

    async def remember(self, owner: str, conversation: str, memory: str,
                       remembered: int) -> None:
        def change(meta: dict) -> list[dict]:
            meta["memory"] = memory[:self.limits.message_chars]
            meta["remembered"] = max(0, min(remembered, int(meta["n"])))
            return []

        await self._update(owner, conversation, change)

    async def delete(self, owner: str, conversation: str) -> bool:
        try:
            meta, revision = await self._meta(owner, conversation)
        except NotFound:
            return False
        return await self._drop(conversation, meta, revision)

    async def _drop(self, cid: str, meta: dict, revision: int) -> bool:
        messages = self._key("m", cid, "")
        done = await self._txn(
            [{"target": "MOD", "key": _b64(self._key("c", cid)),
              "mod_revision": str(revision), "result": "EQUAL"}],
            [{"request_delete_range": {"key": _b64(self._key("c", cid))}},
             {"request_delete_range": {"key": _b64(self._key("o", self._owner(meta["owner"]),
                                                              cid))}},
             {"request_delete_range": {"key": _b64(messages),
                                       "range_end": _b64(_end(messages))}}])
        return done or not await self._range(self._key("c", cid))  # gone: by this call?

    # --- for what else routers share in this etcd (pichat/router/daemon/keyring.py) ----

    async def items(self, root: str, since: int = 0) -> tuple[list[tuple[str, bytes, int]], int]:
        """The keys under `root` (beside the store's own) written after revision `since`:
        (name below `root`, value as stored, mod revision) each; and the revision the
        answer is as of (what `since` should be next)."""
        prefix = self._key(root)
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_end(prefix))}
        if since:
            body["min_mod_revision"] = str(since + 1)
        answer = await self._call("kv/range", body)
        found = [(base64.b64decode(kv["key"])[len(prefix):].decode("utf-8", "replace"),
                  base64.b64decode(kv.get("value", "")), int(kv.get("mod_revision", 0)))
                 for kv in answer.get("kvs", ())]
        return found, int(answer.get("header", {}).get("revision", 0))

    async def swap(self, root: str, name: str, value: bytes, revision: int) -> int | None:
        """Write `value` at `root` `name` if its mod revision is still `revision` (0: it
        does not exist): the revision written, or None (someone wrote it first)."""
        key = _b64(self._key(root) + name.encode())
        answer = await self._call("kv/txn", {
            "compare": [{"target": "MOD", "key": key, "mod_revision": str(revision),
                         "result": "EQUAL"}],
            "success": [{"request_put": {"key": key, "value": _b64(value)}}]})
        if not answer.get("succeeded"):
            return None
        return int(answer.get("header", {}).get("revision", 0))

    async def get_item(self, root: str, name: str) -> bytes | None:
        """The value at `root` `name` (None if none)."""
        answer = await self._call("kv/range", {"key": _b64(self._key(root) + name.encode())})
        kvs = answer.get("kvs") or ()
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    async def put_item(self, root: str, name: str, value: bytes) -> None:
        await self._call("kv/put", {"key": _b64(self._key(root) + name.encode()),
                                    "value": _b64(value)})

    # --- leases (pichat/router/daemon/election.py) ----------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds (etcd may make it longer): its id."""
        answer = await self._call("lease/grant", {"TTL": ttl})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew `lease`: the seconds it has now (0: it has expired)."""
        answer = await self._call("lease/keepalive", {"ID": str(lease)})
        return int((answer.get("result") or {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._call("lease/revoke", {"ID": str(lease)})

    async def claim(self, root: str, name: str, value: bytes, lease: int) -> bool:
        """Is `root` `name` held under `lease`? Written (with `value`, bound to the lease)
        if nobody holds it: True if it is now, or already was, this lease's."""
        key = _b64(self._key(root) + name.encode())
        answer = await self._call("kv/txn", {
            "compare": [{"target": "CREATE", "key": key, "create_revision": "0",
                         "result": "EQUAL"}],
            "success": [{"request_put": {"key": key, "value": _b64(value),
                                         "lease": str(lease)}}],
            "failure": [{"request_range": {"key": key}}]})
        if answer.get("succeeded"):
            return True
        for response in answer.get("responses") or ():
            for kv in (response.get("response_range") or {}).get("kvs") or ():
                return int(kv.get("lease", 0)) == lease
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- bounds -----------------------------------------------------------------------

    async def _bound(self, owner: str, keep: str) -> None:
        """Drop the least recently updated conversations past the owner's share, and (every
        `_SCAN_EVERY` of the bound written here) past the store's bound."""
        lim = self.limits
        rows = [(cid, nbytes) for cid, _, nbytes, _ in reversed(await self._index(owner))]
        gone = await self._trim(rows, lim.max_bytes * lim.owner_share, keep)
        if self._written >= lim.max_bytes * _SCAN_EVERY:
            self._written = 0
            prefix = self._key("o", "")
            every = [(key.rsplit(b"/", 1)[1].decode(), value[0], value[1])
                     for key, value, _ in await self._range(prefix, _end(prefix))]
            every.sort(key=lambda row: row[1])
            gone += await self._trim([(cid, nbytes) for cid, _, nbytes in every],
                                     lim.max_bytes, keep)
        if gone:
            log.info("conversation store at its bound: dropped the %d least recently used "
                     "conversations", gone)

    async def _trim(self, rows: list[tuple[str, int]], bound: float, keep: str) -> int:
        gone = 0
        for cid, _ in victims(rows, sum(nbytes for _, nbytes in rows), bound, keep):
            found = await self._range(self._key("c", cid))
            if found and isinstance(found[0][1], dict):
                if await self._drop(cid, found[0][1], found[0][2]):
                    gone += 1
        self.dropped += gone
        return gone
