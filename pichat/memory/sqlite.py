"""The default conversation store: one SQLite file (`--db PATH`).

Write-ahead log and `synchronous=FULL`: a turn is stored once its transaction commits,
and a kill (or a power cut) at any moment leaves the file whole, with every committed
turn. The schema carries its version (`PRAGMA user_version`); an older file is migrated
on open, one step per version, each in one transaction; a file from a newer pichat is
refused (`NewerStore`) and left untouched. The file is made readable by its owner only
(it holds people's conversations).

All calls run on one thread of the store's own, one connection, so the router's event
loop never waits on the disk and SQLite sees one writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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

__all__ = ["SQLiteStore", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MIGRATIONS: list[list[str]] = [
    [  # 1: conversations and their messages
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,
            updated REAL NOT NULL,
            n_messages INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            memory TEXT NOT NULL DEFAULT '',
            remembered INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX conversations_by_owner ON conversations (owner, updated)",
        "CREATE INDEX conversations_by_age ON conversations (updated)",
        """CREATE TABLE messages (
            conversation TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created REAL NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            worker TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (conversation, seq)
        ) WITHOUT ROWID""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteStore:
    """A `pichat.memory.store.Store` in one SQLite file. Make it with `await
    SQLiteStore.open(path)`."""

    def __init__(self, path: str | Path, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.limits = limits or Limits()
        self.clock = clock
        self.dropped = 0
        """Conversations deleted to keep the store within its byte bounds."""
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pichat-db")

    @classmethod
    async def open(cls, path: str | Path, limits: Limits | None = None,
                   clock: Callable[[], float] = time.time) -> SQLiteStore:
        store = cls(path, limits, clock)
        try:
            await store._run(store._open)
        except (OSError, sqlite3.Error) as exc:
            store._thread.shutdown(wait=False)
            raise PichatError(f"cannot open the conversation store {store.path}: {exc} "
                              "(--db PATH elsewhere, or --db off for none)") from None
        except BaseException:
            store._thread.shutdown(wait=False)
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- the Store interface ----------------------------------------------------------

    async def create(self, owner: str, *, title: str = "", model: str = "",
                     messages: tuple[Message, ...] = ()) -> Conversation:
        return await self._run(self._create, owner, title, model, messages)

    async def get(self, owner: str, conversation: str, offset: int = 0,
                  limit: int | None = None) -> Conversation:
        return await self._run(self._get, owner, conversation, offset, limit)

    async def find(self, owner: str, title: str) -> Conversation | None:
        return await self._run(self._find, owner, title)

    async def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[Summary]:
        return await self._run(self._list, owner, limit, offset)

    async def append(self, owner: str, conversation: str, messages: tuple[Message, ...],
                     after: int | None = None, turn: str = "") -> None:
        await self._run(self._append, owner, conversation, messages, after)

    async def rename(self, owner: str, conversation: str, title: str) -> None:
        await self._run(self._rename, owner, conversation, title[:200])

    async def remember(self, owner: str, conversation: str, memory: str,
                       remembered: int) -> None:
        await self._run(self._remember, owner, conversation, memory, remembered)

    async def delete(self, owner: str, conversation: str) -> bool:
        return await self._run(self._delete, owner, conversation)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    # --- on the store's thread --------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # private from the start (its -wal/-shm inherit this)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise NewerStore(
                    f"{self.path} was written by a newer pichat (schema {version}; this one "
                    f"knows {SCHEMA_VERSION}): upgrade pichat, or give --db another file")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA busy_timeout = 5000")
            for step in range(version, SCHEMA_VERSION):
                db.execute("BEGIN IMMEDIATE")
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")
                db.execute("COMMIT")
                log.info("conversation store %s: schema %d", self.path, step + 1)
        except BaseException:
            db.close()
            raise
        self._db = db

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the store is closed")
        return self._db

    def _create(self, owner: str, title: str, model: str,
                messages: tuple[Message, ...]) -> Conversation:
        (count,) = self.db.execute("SELECT count(*) FROM conversations WHERE owner = ?",
                                   (owner,)).fetchone()
        check_count(count, self.limits)
        now = self.clock()
        cid = secrets.token_hex(8)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO conversations (id, owner, title, model, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)", (cid, owner, title[:200], model[:200], now, now))
            self._insert(owner, cid, 0, 0, messages)
            self._bound(owner, cid)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return self._get(owner, cid)

    def _row(self, owner: str, cid: str) -> tuple:
        row = self.db.execute(
            "SELECT id, owner, title, model, created, updated, n_messages, bytes, memory, "
            "remembered FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {cid[:40]!r} of yours")
        return row

    def _get(self, owner: str, cid: str, offset: int = 0,
             limit: int | None = None) -> Conversation:
        row = self._row(owner, cid)
        messages = tuple(Message(*m) for m in self.db.execute(
            "SELECT role, content, created, model, worker FROM messages "
            "WHERE conversation = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (cid, max(0, offset), -1 if limit is None else max(0, limit))))
        return Conversation(row[0], row[1], row[2], row[3], row[4], row[5], messages,
                            row[8], row[9], row[6])

    def _find(self, owner: str, title: str) -> Conversation | None:
        row = self.db.execute(
            "SELECT id FROM conversations WHERE owner = ? AND title = ? "
            "ORDER BY updated DESC LIMIT 1", (owner, title)).fetchone()
        return self._get(owner, row[0], 0, 0) if row else None

    def _list(self, owner: str, limit: int, offset: int) -> list[Summary]:
        rows = self.db.execute(
            "SELECT id, title, model, created, updated, n_messages FROM conversations "
            "WHERE owner = ? ORDER BY updated DESC LIMIT ? OFFSET ?",
            (owner, max(0, min(limit, 1000)), max(0, offset)))
        return [Summary(*r) for r in rows]

    def _append(self, owner: str, cid: str, messages: tuple[Message, ...],
                after: int | None) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self._row(owner, cid)
            check_after(cid, row[6], after)
            self._insert(owner, cid, row[6], row[7], messages)
            self._bound(owner, cid)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _insert(self, owner: str, cid: str, n: int, nbytes: int,
                messages: tuple[Message, ...]) -> None:
        """Add `messages` to conversation `cid` (holding `n` messages of `nbytes`), within
        the limits, inside the caller's transaction."""
        added = measure(messages, self.limits, n, nbytes)
        now = self.clock()
        self.db.executemany(
            "INSERT INTO messages (conversation, seq, role, content, created, model, worker) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(cid, n + i, m.role, m.content, m.created or now, m.model[:200], m.worker[:200])
             for i, m in enumerate(messages)])
        self.db.execute("UPDATE conversations SET n_messages = ?, bytes = ?, updated = ? "
                        "WHERE id = ?", (n + len(messages), nbytes + added, now, cid))

    def _rename(self, owner: str, cid: str, title: str) -> None:
        self._row(owner, cid)
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))

    def _remember(self, owner: str, cid: str, memory: str, remembered: int) -> None:
        row = self._row(owner, cid)
        memory = memory[:self.limits.message_chars]
        self.db.execute("UPDATE conversations SET memory = ?, remembered = ? WHERE id = ?",
                        (memory, max(0, min(remembered, row[6])), cid))

    def _delete(self, owner: str, cid: str) -> bool:
        cursor = self.db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                                 (cid, owner))
        return cursor.rowcount > 0

    def _bound(self, owner: str, keep: str) -> None:
        """Drop the least recently updated conversations (never `keep`) while `owner`
        holds more than its share of the bytes, then while the store holds more than its
        bound (inside the caller's transaction)."""
        lim = self.limits
        dropped = freed = 0
        for who, bound in ((owner, lim.max_bytes * lim.owner_share), (None, lim.max_bytes)):
            where, args = ("WHERE owner = ?", (who,)) if who is not None else ("", ())
            (total,) = self.db.execute(f"SELECT coalesce(sum(bytes), 0) FROM conversations "
                                       f"{where}", args).fetchone()
            if total <= bound:
                continue
            rows = self.db.execute(f"SELECT id, bytes FROM conversations {where} "
                                   f"ORDER BY updated", args).fetchall()
            for cid, nbytes in victims(rows, total, bound, keep):
                self.db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
                dropped, freed = dropped + 1, freed + nbytes
        if dropped:
            self.dropped += dropped
            log.info("conversation store at its bound: dropped the %d least recently used "
                     "conversations (%.1f MB)", dropped, freed / 1e6)
