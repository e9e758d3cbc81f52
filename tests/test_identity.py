"""Owners, per-owner sessions, leases and worker names (pure)."""

from __future__ import annotations

from pichat.router.policy.identity import Leases, NameBook, owner_tag, scoped_session


def test_sessions_are_scoped_per_owner_and_tags_are_stable_and_opaque():
    assert scoped_session("key:ann", "s1") != scoped_session("key:bob", "s1")
    assert scoped_session("key:ann", "s1") == scoped_session("key:ann", "s1")
    tag = owner_tag("key:ann")
    assert len(tag) == 12 and "ann" not in tag
    assert scoped_session("key:ann", "s1") == f"{tag}~s1"


def test_a_lease_is_valid_only_for_its_worker_session_and_router_secret():
    leases = Leases(b"router secret")
    lease = leases.sign("pi2", "t~s1")
    assert leases.valid("pi2", "t~s1", lease)
    assert not leases.valid("pi3", "t~s1", lease)      # another worker's identity
    assert not leases.valid("pi2", "t~s2", lease)      # another session
    assert not leases.valid("pi2", "t~s1", "0" * 32)   # forged
    assert not Leases(b"other secret").valid("pi2", "t~s1", lease)
    assert Leases(b"router secret").valid("pi2", "t~s1", lease)  # a restarted router


def test_a_name_belongs_to_the_key_that_holds_it_while_any_registration_uses_it():
    book = NameBook()
    assert book.claim("pi", "key-a", b"r1") is None
    assert book.claim("pi", "key-b", b"r2") == "key-a"   # taken
    assert book.claim("pi", "key-a", b"r3") is None      # the same key again (a restart)
    book.release("pi", b"r1")
    assert book.claim("pi", "key-b", b"r2") == "key-a"   # r3 still uses it
    book.release("pi", b"r3")
    assert book.claim("pi", "key-b", b"r2") is None      # free now
    assert len(book) == 1
