"""Warm conversations on disk: a worker that restarts (an upgrade, a reboot, a power cut)
finds its conversations' KV states again.

One file per session in `--state-dir`, named by a hash of the session id (ids come from
clients: never a path). A file is

    MAGIC | header length (u32 LE) | header (JSON) | token ids (u32 LE each) | state bytes

and the header holds the session, its owner and lease, the state's `format` (model and KV
type: a state is never loaded into another), the lengths and a SHA-256 of the tokens and
bytes. Files are written whole to a temporary name, flushed to the device and renamed, so
a crash leaves either the old file or the new one; a file whose lengths or digest do not
match (a torn write, a bad sector, a hand edit) is deleted when found, and the
conversation is read again from its text.

Writing happens on a thread of its own, behind generation: `put` only queues the state
(the newest state of a session replaces one still waiting), and the queue is bounded in
bytes. The files are bounded by `budget` bytes, the least recently used deleted first
(file times keep that order across restarts).

A directory belongs to one worker at a time (a lock file). Replicas that share one volume
(docker compose `replicas`) name it `PARENT/*`: each takes the first of `PARENT/0`,
`PARENT/1`, ... that no running worker holds, so a replica started again finds a
directory of states (its own, or a sibling's from before: the router accepts the claims
only with valid leases, which replicas sharing a key share).
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from pichat.claims import claim
from pichat.errors import PichatError
from pichat.logs import clip
from pichat.worker.engine.backend import SavedState

__all__ = ["DiskStore", "OnDisk"]

log = logging.getLogger(__name__)

MAGIC = b"PICHATKV1\n"
MAX_HEADER = 16 * 1024
MAX_PENDING = 256 << 20
"""Bytes of states waiting to be written, at most (older ones wait for the next turn)."""
_SUFFIX = ".kv"


@dataclass(slots=True)
class OnDisk:
    path: Path
    nbytes: int
    owner: str | None
    lease: str | None
    n_tokens: int


class DiskStore:
    def __init__(self, directory: str | Path, budget_bytes: int, fmt: str) -> None:
        self.dir, self._lock_file = claim(str(directory), "worker", "a --state-dir")
        # The states are the conversations (their token ids): the worker's user's only,
        # as the conversation database is (files made before this are closed too).
        try:
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise PichatError(f"cannot make {self.dir} private (--state-dir): "
                              f"{exc.strerror}") from None
        self.budget = budget_bytes
        self.format = fmt
        self.nbytes = 0
        self.written = 0
        self.restored = 0
        self.refused: Counter[str] = Counter()
        self.dropped: list[str] = []
        """Sessions deleted to stay in budget since the last `take_dropped`."""
        self._index: OrderedDict[str, OnDisk] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[SavedState, str | None]] = OrderedDict()
        self._pending_bytes = 0
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="kv-disk", daemon=True)
        self._thread.start()

    # --- reading ---------------------------------------------------------------------

    def _scan(self) -> None:
        """Index the files already there (headers only), oldest use first."""
        found = []
        for path in self.dir.iterdir():
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write a crash interrupted
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
                header, size = _read_header(path)
            except (OSError, ValueError) as exc:
                self._refuse(path, "torn", str(exc))
                continue
            if header["format"] != self.format:
                self._refuse(path, "format", f"made for {header['format']}")
                continue
            if path.name != _file_name(header["session"]):
                self._refuse(path, "torn", "its name does not match its session")
                continue
            found.append((path.stat().st_mtime, header, path, size))
        for _, header, path, size in sorted(found, key=lambda f: f[0]):
            self._index[header["session"]] = OnDisk(path, size, header["owner"],
                                                    header["lease"], header["n_tokens"])
            self.nbytes += size
        log.info("KV states kept in %s: %d warm conversations there (%.1f MB)", self.dir,
                 len(self._index), self.nbytes / 1e6)
        self._evict()

    def sessions(self) -> list[tuple[str, str | None]]:
        """(session, lease) of each conversation on disk or waiting to be written."""
        with self._lock:
            listed = {s: d.lease for s, d in self._index.items()}
            listed.update({s: lease for s, (_, lease) in self._pending.items()})
        return list(listed.items())

    @property
    def files(self) -> int:
        """States written (not counting those waiting to be)."""
        with self._lock:
            return len(self._index)

    def has(self, session: str) -> bool:
        with self._lock:
            return session in self._index or session in self._pending

    def load(self, session: str) -> SavedState | None:
        """The session's state, checked whole (None if there is none or it is damaged:
        a damaged file is deleted)."""
        with self._lock:
            waiting = self._pending.get(session)
            entry = self._index.get(session)
        if waiting is not None:
            return waiting[0]
        if entry is None:
            return None
        try:
            state = _read_state(entry.path, self.format, session)
        except (OSError, ValueError) as exc:
            with self._lock:
                if self._index.get(session) is entry:
                    del self._index[session]
                    self.nbytes -= entry.nbytes
            self._refuse(entry.path, "torn", str(exc))
            return None
        with self._lock:
            if session in self._index:
                self._index.move_to_end(session)
        _touch(entry.path)
        self.restored += 1
        return state

    def _refuse(self, path: Path, reason: str, detail: str) -> None:
        with self._lock:
            self.refused[reason] += 1
        log.warning("KV state %s ignored and deleted (%s: %s); its conversation will be "
                    "read again", path.name, reason, clip(detail, 120))
        path.unlink(missing_ok=True)

    # --- writing ---------------------------------------------------------------------

    def put(self, session: str, state: SavedState, lease: str | None) -> None:
        """Queue `state` to be written (replacing an older one still waiting)."""
        if state.nbytes > self.budget:
            return
        with self._lock:
            old = self._pending.pop(session, None)
            if old is not None:
                self._pending_bytes -= old[0].nbytes
            while self._pending and self._pending_bytes + state.nbytes > MAX_PENDING:
                _, (dropped, _) = self._pending.popitem(last=False)
                self._pending_bytes -= dropped.nbytes
            self._pending[session] = (state, lease)
            self._pending_bytes += state.nbytes
            self._idle.clear()
            self._wake.notify()

    def drop(self, session: str) -> None:
        with self._lock:
            waiting = self._pending.pop(session, None)
            if waiting is not None:
                self._pending_bytes -= waiting[0].nbytes
            entry = self._index.pop(session, None)
            if entry is not None:
                self.nbytes -= entry.nbytes
        if entry is not None:
            entry.path.unlink(missing_ok=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued state is written; False on timeout."""
        return self._idle.wait(timeout)

    def take_dropped(self) -> list[str]:
        with self._lock:
            dropped, self.dropped = self.dropped, []
        return dropped

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        self._lock_file.close()

    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._idle.set()
                    self._wake.wait()
                if not self._pending:  # closed and nothing left
                    self._idle.set()
                    return
                session, (state, lease) = self._pending.popitem(last=False)
            try:
                path, size = self._write(session, state, lease)
            except OSError as exc:
                log.warning("could not write the KV state of a conversation to %s: %s",
                            self.dir, exc)
                with self._lock:
                    self._pending_bytes -= state.nbytes
                continue
            with self._lock:
                self._pending_bytes -= state.nbytes
                old = self._index.pop(session, None)
                if old is not None:
                    self.nbytes -= old.nbytes
                self._index[session] = OnDisk(path, size, state.owner, lease, len(state.tokens))
                self.nbytes += size
                self.written += 1
            self._evict()

    def _write(self, session: str, state: SavedState, lease: str | None) -> tuple[Path, int]:
        tokens = array.array("I", state.tokens)
        if sys.byteorder != "little":
            tokens.byteswap()
        body = tokens.tobytes()
        digest = hashlib.sha256(body)
        digest.update(state.data)
        header = json.dumps({"session": session, "owner": state.owner, "lease": lease,
                             "format": state.format, "n_tokens": len(state.tokens),
                             "data_bytes": len(state.data), "nbytes": state.nbytes,
                             "sha256": digest.hexdigest()}).encode()
        path = self.dir / _file_name(session)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(4, "little") + header)
            f.write(body)
            f.write(state.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        return path, path.stat().st_size

    def _evict(self) -> None:
        while True:
            with self._lock:
                if self.nbytes <= self.budget or not self._index:
                    return
                session, entry = self._index.popitem(last=False)
                self.nbytes -= entry.nbytes
                self.dropped.append(session)
            entry.path.unlink(missing_ok=True)


def _file_name(session: str) -> str:
    return hashlib.blake2b(session.encode(), digest_size=16).hexdigest() + _SUFFIX


def _read_header(path: Path) -> tuple[dict, int]:
    """The file's header, checked against the file's size; and that size."""
    with open(path, "rb") as f:
        return _header(f)


def _header(f) -> tuple[dict, int]:  # noqa: ANN001 (a binary file)
    size = os.fstat(f.fileno()).st_size
    head = f.read(len(MAGIC) + 4)
    if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a pichat KV state file")
    n = int.from_bytes(head[len(MAGIC):], "little")
    if n > MAX_HEADER:
        raise ValueError("header too long")
    header = json.loads(f.read(n))
    if not isinstance(header, dict) or not {"session", "owner", "lease", "format",
                                            "n_tokens", "data_bytes", "nbytes",
                                            "sha256"} <= header.keys():
        raise ValueError("header incomplete")
    if not (all(isinstance(header[k], str) for k in ("session", "format", "sha256"))
            and all(isinstance(header[k], int) and not isinstance(header[k], bool)
                    and header[k] >= 0 for k in ("n_tokens", "data_bytes", "nbytes"))
            and all(header[k] is None or isinstance(header[k], str)
                    for k in ("owner", "lease"))):
        raise ValueError("header malformed")
    expected = len(MAGIC) + 4 + n + 4 * int(header["n_tokens"]) + int(header["data_bytes"])
    if size != expected:
        raise ValueError(f"{size} bytes where the header promises {expected} (torn)")
    return header, size


def _read_state(path: Path, fmt: str, session: str) -> SavedState:
    with open(path, "rb") as f:  # one open file: a rename meanwhile cannot mix two states
        header, _ = _header(f)
        if header["format"] != fmt or header["session"] != session:
            raise ValueError("made for another model, KV type or session")
        body = f.read(4 * header["n_tokens"])
        data = f.read(header["data_bytes"])
    digest = hashlib.sha256(body)
    digest.update(data)
    if digest.hexdigest() != header["sha256"]:
        raise ValueError("its digest does not match (corrupt)")
    tokens = array.array("I")
    tokens.frombytes(body)
    if sys.byteorder != "little":
        tokens.byteswap()
    # Charged at what it holds, whatever its header says (as a migrated state is).
    nbytes = len(data) + 4 * len(tokens) if data else header["nbytes"]
    return SavedState(tuple(tokens), data, nbytes, owner=header["owner"], format=fmt)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
