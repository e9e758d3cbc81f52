"""The router's memory: conversations kept for their owners (store.py: the interface;
sqlite.py: the default, one file; postgres.py and etcd.py: shared by several routers)."""

from __future__ import annotations

from pichat.memory.store import Limits, Store

__all__ = ["open_store"]


async def open_store(db: str, limits: Limits | None = None) -> Store:
    """The store `--db` names: an etcd:// or postgresql:// URL, else a SQLite file."""
    from pichat.memory.etcd import EtcdStore, is_etcd
    from pichat.memory.postgres import PostgresStore, is_postgres
    from pichat.memory.sqlite import SQLiteStore

    if is_etcd(db):
        return await EtcdStore.open(db, limits)
    if is_postgres(db):
        return await PostgresStore.open(db, limits)
    return await SQLiteStore.open(db, limits)
