"""One keys directory for every router on one etcd (`--db etcd://...` with `--keys`).

Each router keeps its own keys directory (pichat/security.py reads it: allow-lists and
tombstones; pichat/invites.py writes it: invitations, joins, revocations). With the
conversations in etcd, the files routers must agree on (`invites.SHARED`: admitted keys,
tombstones, invitations) are kept alike through etcd too, under `keys/` beside the store's
keys, one etcd key per file: a Pi admitted through either router, or a key revoked on
either, takes effect on all of them within two rounds (`interval`, a quarter of a
heartbeat: one to put it in etcd, one to bring it; the router then looks at its
allow-lists at once).

A round reads what changed in etcd since the last round and what changed here since the
last agreement, and settles each file:

- changed in etcd: written here (a file removed is an empty value there, so that a
  router that was away learns of it); if it changed here too, etcd's wins (it was first)
  and the loss is logged;
- changed here only: written to etcd if etcd still holds what was agreed (a transaction
  on its mod revision), else the next round brings etcd's.

A router that starts takes etcd's version of every file it has, and gives etcd the files
it alone has. The key pairs, the API keys and router.json stay each router's own (copy the
keys directory once, when setting the second router up).

What etcd holds is checked as if a peer sent it: a name that is not a shared file's, a
value over `MAX_BYTES` or not text is skipped (logged, aggregated); at most `MAX_FILES`
files are kept (a removed file's empty value, some 60 bytes, does not count).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pichat.errors import PichatError
from pichat.invites import SHARED, put_shared, shared_files
from pichat.logs import Throttle, clip

__all__ = ["KeyRing", "ROOT", "MAX_BYTES", "MAX_FILES"]

log = logging.getLogger(__name__)

ROOT = "keys/"
MAX_BYTES = 16 * 1024
"""A shared file's size at most (an admitted key's file is about 300 bytes)."""
MAX_FILES = 10_000
GONE = b""


class Shared(Protocol):
    """The store's side of it (pichat/memory/etcd.py)."""

    async def items(self, root: str, since: int = 0
                    ) -> tuple[list[tuple[str, bytes, int]], int]: ...

    async def swap(self, root: str, name: str, value: bytes, revision: int) -> int | None: ...


class KeyRing:
    def __init__(self, etcd: Shared, keys_dir: Path, *, interval: float,
                 on_change: Callable[[], None] = lambda: None,
                 log_window: float = 60.0) -> None:
        self.etcd = etcd
        self.keys_dir = keys_dir
        self.interval = interval
        self.on_change = on_change
        """Called after a round that wrote files here (the router looks at its
        allow-lists then, not at its next heartbeat)."""
        self.agreed: dict[str, tuple[bytes, int]] = {}
        """Per file, what etcd and this directory last agreed it holds, and its mod
        revision in etcd."""
        self.since = 0
        """etcd's revision as of the last round."""
        self.rounds = 0
        self.pulled = 0
        self.pushed = 0
        self.throttle = Throttle(log, log_window)
        self.lock = asyncio.Lock()
        """Held by a round, and by a join from its first round to its `settle`."""
        self._stamps: dict[str, tuple[int, int]] = {}
        self._unread: set[str] = set()
        """Shared files here that could not be read (or are too big) at the last scan: a
        tombstone that cannot be read must not be shared as removed."""
        self._read: dict[str, bytes] = {}

    async def run(self) -> None:
        """Rounds until cancelled; etcd out of reach costs a log line (aggregated) and
        the next round tries again."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                pulled = self.pulled
                await self.sync()
                if self.pulled > pulled:
                    self.on_change()
            except PichatError as exc:
                self.throttle.log(loop.time(), logging.WARNING, "keys not shared",
                                  "keys directory not shared this round: %s", exc)
            except OSError as exc:
                self.throttle.log(loop.time(), logging.ERROR, "keys not written",
                                  "cannot write the keys directory %s: %s", self.keys_dir,
                                  exc)
            self.throttle.flush(loop.time())

    async def sync(self) -> int:
        """One round: the number of files written here or in etcd."""
        async with self.lock:
            return await self.round()

    async def settle(self, rel: str, undo: Callable[[], None]) -> bool:
        """Put this directory's `rel` in etcd now if etcd still holds what was last agreed;
        else `undo()` what came of it here, take etcd's, and say False. Held under `lock`
        from the `round` that read it, this makes a join's use of an invitation count once
        across routers: two routers using its last use at once both write it, and only
        one write lands (the other join is undone before anything of it leaves)."""
        assert self.lock.locked()
        mine = self._scan().get(rel, GONE)
        agreed = self.agreed.get(rel, (GONE, 0))
        if mine == agreed[0] or rel in self._unread:
            return True
        written = await self.etcd.swap(ROOT, rel, mine, agreed[1])
        if written is not None:
            self.agreed[rel] = (mine, written)
            self.pushed += 1
            return True
        undo()
        await self.round()  # brings etcd's (it changed after `since`)
        return False

    async def round(self) -> int:
        """`sync` with `lock` held by the caller."""
        assert self.lock.locked()
        changed, revision = await self.etcd.items(ROOT, self.since)
        here = self._scan()
        done = 0
        live = sum(1 for value, _ in self.agreed.values() if value)
        for rel, value, mod in changed:
            if not self._valid(rel, value, live):
                continue
            live += bool(value) - bool(self.agreed.get(rel, (GONE,))[0])
            mine = here.get(rel, GONE)
            if mine != value:
                if self.rounds and self.agreed.get(rel, (GONE,))[0] != mine:
                    log.warning("%s changed on this router and on another at once: the "
                                "other's is kept", rel)
                put_shared(self.keys_dir, rel, value.decode() if value else None)
                here[rel] = value
                if not value:
                    del here[rel]
                self.pulled += 1
                done += 1
            self.agreed[rel] = (value, mod)
        self.since = max(self.since, revision)
        for rel in set(here) | {rel for rel, (value, _) in self.agreed.items() if value}:
            if rel in self._unread:  # there, but not read: not a removal to share
                continue
            mine = here.get(rel, GONE)
            agreed = self.agreed.get(rel, (GONE, 0))
            if mine == agreed[0] or (mine and not agreed[0] and live >= MAX_FILES):
                continue
            written = await self.etcd.swap(ROOT, rel, mine, agreed[1])
            if written is not None:  # else another router's, brought by the next round
                live += bool(mine) - bool(agreed[0])
                self.agreed[rel] = (mine, written)
                self.pushed += 1
                done += 1
        self.rounds += 1
        return done

    def _valid(self, rel: str, value: bytes, live: int) -> bool:
        why = ""
        if not SHARED.match(rel):
            why = "not a shared file's name"
        elif len(value) > MAX_BYTES:
            why = f"{len(value)} bytes (at most {MAX_BYTES})"
        elif value and not self.agreed.get(rel, (GONE,))[0] and live >= MAX_FILES:
            why = f"more than {MAX_FILES} shared files"
        else:
            try:
                value.decode()
            except UnicodeDecodeError:
                why = "not text"
        if why:
            self.throttle.log(asyncio.get_running_loop().time(), logging.WARNING,
                              "keys skipped", "skipping %s%s in etcd: %s", ROOT,
                              clip(rel, 80), why, detail=clip(rel, 80))
        return not why

    def _scan(self) -> dict[str, bytes]:
        """The shared files here now (re-read only those whose size or mtime changed)."""
        stamps = shared_files(self.keys_dir)
        here: dict[str, bytes] = {}
        self._unread = set()
        for rel, stamp in stamps.items():
            if self._stamps.get(rel) != stamp or rel not in self._read:
                self._read.pop(rel, None)
                try:
                    if stamp[1] <= MAX_BYTES:
                        self._read[rel] = (self.keys_dir / rel).read_bytes()
                except OSError:
                    pass
            if rel in self._read:
                here[rel] = self._read[rel]
            else:  # too big or unreadable: neither shared nor taken for removed
                self._unread.add(rel)
        for rel in set(self._read) - set(stamps):
            del self._read[rel]
        self._stamps = stamps
        return here
