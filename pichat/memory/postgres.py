"""The conversation store in PostgreSQL (`--db postgresql://USER@HOST/DB`), for more than
one router (or more users than one SQLite file serves well): the same `Store` as
pichat/memory/sqlite.py, the same bounds, over psycopg 3 (async) with a small connection
pool.

Its tables are prefixed `pichat_` (the database may hold others). The schema's version is
kept in `pichat_schema`; routers starting together migrate it once (a transaction-scoped
advisory lock), and a database from a newer pichat is refused (`NewerStore`) and left
alone. Each write is one transaction; writes of one owner are serialized (an advisory lock
on the owner), so the owner's bounds hold across routers. The store-wide byte bound is
enforced by whichever write passes it (two routers may overshoot it by a turn each before
the next write trims it back).

A password in the URL is never logged or shown in an error.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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

__all__ = ["PostgresStore", "SCHEMA_VERSION", "is_postgres", "redact"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: list[list[str]] = [
    [  # 1: conversations and their messages
        """CREATE TABLE pichat_conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            created DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL,
            n_messages INTEGER NOT NULL DEFAULT 0,
            bytes BIGINT NOT NULL DEFAULT 0,
            memory TEXT NOT NULL DEFAULT '',
            remembered INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX pichat_conversations_by_owner ON pichat_conversations (owner, updated)",
        "CREATE INDEX pichat_conversations_by_age ON pichat_conversations (updated)",
        """CREATE TABLE pichat_messages (
            conversation TEXT NOT NULL
                REFERENCES pichat_conversations (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            worker TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (conversation, seq)
        )""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

_MIGRATION_LOCK = 0x70696368  # "pich": one migration at a time across routers

_COLUMNS = ("id, owner, title, model, created, updated, n_messages, bytes, memory, "
            "remembered")


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """`url` without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class PostgresStore:
    """A `pichat.memory.store.Store` in a PostgreSQL database. Make it with `await
    PostgresStore.open(url)`."""

    def __init__(self, url: str, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time, pool_size: int = 4) -> None:
        from psycopg_pool import AsyncConnectionPool

        self.url = url
        self.path = redact(url)
        """Where it is, as shown (`--db`, without the password)."""
        self.limits = limits or Limits()
        self.clock = clock
        self.dropped = 0
        self.pool = AsyncConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                        timeout=10.0)

    @classmethod
    async def open(cls, url: str, limits: Limits | None = None,
                   clock: Callable[[], float] = time.time) -> PostgresStore:
        try:
            import psycopg

            store = cls(url, limits, clock)
        except ImportError:
            raise PichatError("a PostgreSQL conversation store needs psycopg: pip install "
                              "'psycopg[binary,pool]' (or: pip install 'pichat[postgres]')"
                              ) from None
        try:
            # One connection first: a wrong address or password fails at once, with
            # the server's reason (the pool would retry until its timeout).
            probe = await psycopg.AsyncConnection.connect(url, connect_timeout=10)
            await probe.close()
            await store.pool.open(wait=True, timeout=10.0)
            await store._migrate()
        except (psycopg.Error, OSError) as exc:
            await store.pool.close()
            raise PichatError(f"cannot open the conversation store {store.path}: "
                              f"{_first_line(exc)} (--db another URL, or --db off for none)"
                              ) from None
        except BaseException as exc:
            await store.pool.close()
            if type(exc).__name__ == "PoolTimeout":
                raise PichatError(f"cannot reach the conversation store {store.path} "
                                  "(--db another URL, or --db off for none)") from None
            raise
        return store

    async def _migrate(self) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS pichat_schema "
                               "(version INTEGER NOT NULL)")
            row = await (await conn.execute("SELECT version FROM pichat_schema")).fetchone()
            version = row[0] if row else 0
            if row is None:
                await conn.execute("INSERT INTO pichat_schema VALUES (0)")
            if version > SCHEMA_VERSION:
                raise NewerStore(
                    f"{self.path} was written by a newer pichat (schema {version}; this one "
                    f"knows {SCHEMA_VERSION}): upgrade pichat, or give --db another database")
            for step in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[step]:
                    await conn.execute(statement)
                await conn.execute("UPDATE pichat_schema SET version = %s", (step + 1,))
                log.info("conversation store %s: schema %d", self.path, step + 1)

    async def _run(self, work: Callable[[Any], Awaitable[T]], owner: str | None = None) -> T:
        """`work(connection)` in one transaction (serialized with the owner's other
        writes when `owner` is given); a database failure becomes a PichatError."""
        import psycopg

        try:
            async with self.pool.connection() as conn, conn.transaction():
                if owner is not None:
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                       (owner,))
                return await work(conn)
        except psycopg.Error as exc:
            raise PichatError(f"the conversation store failed: {_first_line(exc)}") from None

    # --- the Store interface ----------------------------------------------------------

    async def create(self, owner: str, *, title: str = "", model: str = "",
                     messages: tuple[Message, ...] = ()) -> Conversation:
        cid = secrets.token_hex(8)

        async def work(conn: Any) -> None:
            cur = await conn.execute(
                "SELECT count(*) FROM pichat_conversations WHERE owner = %s", (owner,))
            check_count((await cur.fetchone())[0], self.limits)
            now = self.clock()
            await conn.execute(
                "INSERT INTO pichat_conversations (id, owner, title, model, created, updated) "
                "VALUES (%s, %s, %s, %s, %s, %s)", (cid, owner, title[:200], model[:200],
                                                    now, now))
            await self._insert(conn, cid, 0, 0, messages)
            await self._bound(conn, owner, cid)

        await self._run(work, owner)
        return await self.get(owner, cid)

    async def get(self, owner: str, conversation: str, offset: int = 0,
                  limit: int | None = None) -> Conversation:
        async def work(conn: Any) -> Conversation:
            row = await _row(conn, owner, conversation)
            cur = await conn.execute(
                "SELECT role, content, created, model, worker FROM pichat_messages "
                "WHERE conversation = %s AND seq >= %s ORDER BY seq LIMIT %s",
                (conversation, max(0, offset), None if limit is None else max(0, limit)))
            messages = tuple(Message(*m) for m in await cur.fetchall())
            return Conversation(row[0], row[1], row[2], row[3], row[4], row[5], messages,
                                row[8], row[9], row[6])

        return await self._run(work)

    async def find(self, owner: str, title: str) -> Conversation | None:
        async def work(conn: Any) -> str | None:
            cur = await conn.execute(
                "SELECT id FROM pichat_conversations WHERE owner = %s AND title = %s "
                "ORDER BY updated DESC LIMIT 1", (owner, title))
            row = await cur.fetchone()
            return row[0] if row else None

        cid = await self._run(work)
        return await self.get(owner, cid, 0, 0) if cid else None

    async def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[Summary]:
        async def work(conn: Any) -> list[Summary]:
            cur = await conn.execute(
                "SELECT id, title, model, created, updated, n_messages "
                "FROM pichat_conversations WHERE owner = %s ORDER BY updated DESC "
                "LIMIT %s OFFSET %s", (owner, max(0, min(limit, 1000)), max(0, offset)))
            return [Summary(*r) for r in await cur.fetchall()]

        return await self._run(work)

    async def append(self, owner: str, conversation: str, messages: tuple[Message, ...],
                     after: int | None = None, turn: str = "") -> None:
        async def work(conn: Any) -> None:
            row = await _row(conn, owner, conversation)
            check_after(conversation, row[6], after)
            await self._insert(conn, conversation, row[6], row[7], messages)
            await self._bound(conn, owner, conversation)

        await self._run(work, owner)

    async def rename(self, owner: str, conversation: str, title: str) -> None:
        async def work(conn: Any) -> None:
            await _row(conn, owner, conversation)
            await conn.execute("UPDATE pichat_conversations SET title = %s WHERE id = %s",
                               (title[:200], conversation))

        await self._run(work, owner)

    async def remember(self, owner: str, conversation: str, memory: str,
                       remembered: int) -> None:
        async def work(conn: Any) -> None:
            row = await _row(conn, owner, conversation)
            await conn.execute(
                "UPDATE pichat_conversations SET memory = %s, remembered = %s WHERE id = %s",
                (memory[:self.limits.message_chars], max(0, min(remembered, row[6])),
                 conversation))

        await self._run(work, owner)

    async def delete(self, owner: str, conversation: str) -> bool:
        async def work(conn: Any) -> bool:
            cur = await conn.execute(
                "DELETE FROM pichat_conversations WHERE id = %s AND owner = %s",
                (conversation, owner))
            return cur.rowcount > 0

        return await self._run(work, owner)

    async def close(self) -> None:
        await self.pool.close()

    # --- inside a transaction -----------------------------------------------------------

    async def _insert(self, conn: Any, cid: str, n: int, nbytes: int,
                      messages: tuple[Message, ...]) -> None:
        added = measure(messages, self.limits, n, nbytes)
        now = self.clock()
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO pichat_messages (conversation, seq, role, content, created, "
                "model, worker) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(cid, n + i, m.role, m.content, m.created or now, m.model[:200],
                  m.worker[:200]) for i, m in enumerate(messages)])
        await conn.execute(
            "UPDATE pichat_conversations SET n_messages = %s, bytes = %s, updated = %s "
            "WHERE id = %s", (n + len(messages), nbytes + added, now, cid))

    async def _bound(self, conn: Any, owner: str, keep: str) -> None:
        lim = self.limits
        dropped = freed = 0
        for who, bound in ((owner, lim.max_bytes * lim.owner_share), (None, lim.max_bytes)):
            where, args = ("WHERE owner = %s", (who,)) if who is not None else ("", ())
            cur = await conn.execute(
                f"SELECT coalesce(sum(bytes), 0) FROM pichat_conversations {where}", args)
            (total,) = await cur.fetchone()
            if total <= bound:
                continue
            cur = await conn.execute(
                f"SELECT id, bytes FROM pichat_conversations {where} ORDER BY updated", args)
            for cid, nbytes in victims(await cur.fetchall(), total, bound, keep):
                await conn.execute("DELETE FROM pichat_conversations WHERE id = %s", (cid,))
                dropped, freed = dropped + 1, freed + nbytes
        if dropped:
            self.dropped += dropped
            log.info("conversation store at its bound: dropped the %d least recently used "
                     "conversations (%.1f MB)", dropped, freed / 1e6)


async def _row(conn: Any, owner: str, cid: str) -> tuple:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM pichat_conversations WHERE id = %s AND owner = %s",
        (cid, owner))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no conversation {cid[:40]!r} of yours")
    return row


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
