"""Conversations' KV states on disk (`--state-dir`): written whole or not at all, read back
only when intact and made for this model, bounded, and safe from hostile session ids."""

from __future__ import annotations

import os

import pytest

from pichat.errors import PichatError
from pichat.worker.engine.backend import SavedState
from pichat.worker.store.disk import DiskStore

FMT = "llama:test:1:2:f16"


def state(n: int, seed: int = 0, owner: str | None = "alice") -> SavedState:
    data = bytes((seed + i) % 251 for i in range(64 * n))
    return SavedState(tuple(range(seed, seed + n)), data, len(data) + 4 * n, owner=owner,
                      format=FMT)


def written(directory, budget=1 << 20, fmt=FMT, **states) -> DiskStore:
    store = DiskStore(directory, budget, fmt)
    for session, s in states.items():
        store.put(session, s, f"lease-{session}")
    assert store.flush(10)
    return store


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


def test_a_state_comes_back_whole_after_a_restart(tmp_path):
    a, b = state(50, 1), state(20, 7, owner=None)
    written(tmp_path, a=a, b=b).close()
    store = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        assert sorted(store.sessions()) == [("a", "lease-a"), ("b", "lease-b")]
        got = store.load("a")
        assert (got.tokens, got.data, got.owner, got.format) == (a.tokens, a.data, "alice", FMT)
        assert store.load("b").owner is None
        assert store.load("nobody") is None
        assert store.restored == 2 and not store.refused
    finally:
        store.close()


def test_a_torn_file_is_detected_deleted_and_the_rest_kept(tmp_path):
    written(tmp_path, a=state(50), b=state(30, 3)).close()
    victim = max(tmp_path.glob("*.kv"), key=lambda p: p.stat().st_size)  # a's file
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)  # a power cut in mid-write, say
    (tmp_path / "deadbeef.kv.tmp").write_bytes(b"half a file")
    store = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        assert store.refused["torn"] == 1
        assert [s for s, _ in store.sessions()] == ["b"]
        assert store.load("a") is None and store.load("b") is not None
        assert len(files(tmp_path)) == 1  # the torn file and the stale temporary are gone
    finally:
        store.close()


def test_a_corrupt_byte_is_caught_by_the_digest_when_read(tmp_path):
    written(tmp_path, a=state(50)).close()
    (path,) = tmp_path.glob("*.kv")
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    store = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        assert [s for s, _ in store.sessions()] == ["a"]  # the header is fine
        assert store.load("a") is None
        assert store.refused["torn"] == 1 and files(tmp_path) == []
    finally:
        store.close()


@pytest.mark.parametrize("header", [
    b'{"session": 1}',
    b'{"session": "a", "owner": null, "lease": null, "format": "' + FMT.encode() + b'", '
    b'"n_tokens": -5, "data_bytes": 0, "nbytes": 0, "sha256": ""}',
    b'{"session": "a", "owner": [], "lease": null, "format": "' + FMT.encode() + b'", '
    b'"n_tokens": 0, "data_bytes": 0, "nbytes": 0, "sha256": ""}',
    b"not json at all",
    b"\xff\xfe",
])
def test_a_hand_made_file_with_a_bad_header_is_refused(tmp_path, header):
    from pichat.worker.store.disk import MAGIC

    (tmp_path / "0123.kv").write_bytes(MAGIC + len(header).to_bytes(4, "little") + header)
    store = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        assert store.sessions() == [] and store.refused["torn"] == 1
    finally:
        store.close()


def test_states_made_for_another_model_or_kv_type_are_never_loaded(tmp_path):
    written(tmp_path, a=state(10)).close()
    store = DiskStore(tmp_path, 1 << 20, "llama:test:1:2:q8_0")
    try:
        assert store.sessions() == [] and store.refused["format"] == 1
        assert files(tmp_path) == []
    finally:
        store.close()


def test_the_disk_budget_drops_the_least_recently_used(tmp_path):
    one = state(100).nbytes
    store = written(tmp_path, budget=int(2.5 * one), a=state(100, 1), b=state(100, 2))
    try:
        store.load("a")  # a is now the more recently used
        store.put("c", state(100, 3), None)
        assert store.flush(10)
        assert sorted(s for s, _ in store.sessions()) == ["a", "c"]
        assert store.take_dropped() == ["b"] and store.take_dropped() == []
        assert store.nbytes <= 2.5 * one and len(files(tmp_path)) == 2
        assert store.load("b") is None
    finally:
        store.close()


def test_a_newer_state_replaces_the_older_one(tmp_path):
    store = written(tmp_path, a=state(10, 1))
    store.put("a", state(30, 5), "lease-2")
    assert store.flush(10)
    store.close()
    store = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        assert store.sessions() == [("a", "lease-2")]
        assert store.load("a").tokens == state(30, 5).tokens
        assert len(files(tmp_path)) == 1
    finally:
        store.close()


def test_hostile_session_ids_stay_inside_the_directory(tmp_path):
    inside = tmp_path / "kv"
    names = {"../../escape": state(5, 1), "a/b": state(5, 2), "x" * 500: state(5, 3),
             "\u00e9\u2713\U0001f600": state(5, 4), ".lock": state(5, 5)}
    store = DiskStore(inside, 1 << 20, FMT)
    for session, s in names.items():
        store.put(session, s, None)
    assert store.flush(10)
    try:
        assert sorted(os.listdir(tmp_path)) == ["kv"]
        assert len(files(inside)) == len(names)
        assert all(store.load(s).tokens == names[s].tokens for s in names)
    finally:
        store.close()


def test_two_workers_cannot_share_one_directory(tmp_path):
    first = DiskStore(tmp_path, 1 << 20, FMT)
    try:
        with pytest.raises(PichatError, match="in use by another worker"):
            DiskStore(tmp_path, 1 << 20, FMT)
    finally:
        first.close()
    DiskStore(tmp_path, 1 << 20, FMT).close()  # free again once the first is closed


def test_replicas_sharing_a_volume_each_take_a_directory_and_find_one_again(tmp_path):
    shared = str(tmp_path / "*")
    first = written(shared, a=state(10, 1))
    second = written(shared, b=state(10, 2))
    try:
        assert (first.dir.name, second.dir.name) == ("0", "1")
        assert files(first.dir) != files(second.dir)
    finally:
        first.close()
    again = DiskStore(shared, 1 << 20, FMT)  # the first restarted: directory 0, its state
    try:
        assert again.dir.name == "0"
        assert [s for s, _ in again.sessions()] == ["a"]
    finally:
        again.close()
        second.close()


def test_states_are_private_to_the_workers_user_and_a_header_cannot_shrink_one(tmp_path):
    """A state is a conversation (its token ids): 0600 files in a 0700 directory, as the
    conversation database is; files an older version left readable are closed at start.
    A state read back is charged at what it holds, whatever its header says."""
    directory = tmp_path / "states"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    written(directory, a=state(50)).close()
    assert directory.stat().st_mode & 0o777 == 0o700
    (path,) = directory.glob("*.kv")
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    os.chmod(directory, 0o755)
    raw = path.read_bytes()
    assert b'"nbytes": 3400' in raw
    path.write_bytes(raw.replace(b'"nbytes": 3400', b'"nbytes": 1   '))  # a lie, same length
    store = DiskStore(directory, 1 << 20, FMT)
    try:
        assert directory.stat().st_mode & 0o777 == 0o700
        assert path.stat().st_mode & 0o777 == 0o600
        got = store.load("a")
        assert got.nbytes == len(got.data) + 4 * len(got.tokens)
    finally:
        store.close()
