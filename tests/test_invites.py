"""Join tokens (pichat/invites.py): what a token carries, and that a used, expired, forged
or damaged one lets nobody in."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import zmq.auth

from pichat.errors import PichatError
from pichat.invites import (
    InviteRefused,
    admit,
    invite,
    join,
    members,
    parse,
    redeem,
    remember_router,
    revoke,
    stored_router,
)
from pichat.security import AllowList, keygen

ADDRESS = ("tcp://192.168.1.10:5557", "tcp://pi1.local:5557")


@pytest.fixture
def keys(tmp_path):
    keygen(tmp_path / "keys")
    return tmp_path / "keys"


def router_key(keys) -> str:
    return zmq.auth.load_certificate(keys / "router.key")[0].decode()


def test_a_token_carries_the_routers_public_key_and_a_one_time_secret_only(keys):
    made = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys))
    token = made.token()
    assert parse(token) == made and token.startswith("pichat1.") and "\n" not in token
    # Nothing of any host's secret key travels: only the invitation's own secret.
    secret_keys = [zmq.auth.load_certificate(p)[1].decode()
                   for p in keys.glob("*.key_secret")]
    decoded = json.dumps(parse(token).__repr__())
    assert not any(s in token or s in decoded for s in secret_keys)
    record = keys / "invites" / f"{made.id}.json"
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert made.secret not in record.read_text()  # kept hashed


def test_a_token_is_used_once_expires_and_a_wrong_secret_uses_nothing(keys):
    made = invite(keys, role="client", addresses=ADDRESS, router_key=router_key(keys),
                  ttl=60, now=1000.0)
    with pytest.raises(InviteRefused, match="wrong secret"):
        redeem(keys, made.id, "forged", now=1001.0)
    assert redeem(keys, made.id, made.secret, now=1001.0) == "client"
    with pytest.raises(InviteRefused, match="already used"):
        redeem(keys, made.id, made.secret, now=1002.0)
    late = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys),
                  ttl=60, now=1000.0)
    with pytest.raises(InviteRefused, match="expired"):
        redeem(keys, late.id, late.secret, now=1061.0)
    with pytest.raises(InviteRefused, match="unknown"):
        redeem(keys, "../../etc/passwd", "x")
    # A new invitation forgets those expired a day ago (a deployment inviting at every
    # start), not those expired lately: their late joiner is told "expired".
    stale = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys),
                   ttl=60, now=1000.0)
    day = 86400.0
    live = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys),
                  ttl=2 * day, now=1000.0 + day)
    invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys), now=1100.0)
    with pytest.raises(InviteRefused, match="expired"):
        redeem(keys, stale.id, stale.secret, now=1200.0)
    stale = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys),
                   ttl=60, now=1000.0)
    invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys),
           now=1061.0 + day)
    assert not (keys / "invites" / f"{stale.id}.json").exists()
    assert redeem(keys, live.id, live.secret, now=1080.0 + day) == "worker"


def test_n_uses_hold_when_joiners_race(keys):
    made = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys), uses=3)
    results: list[str] = []

    def join() -> None:
        try:
            results.append(redeem(keys, made.id, made.secret))
        except InviteRefused as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=join) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("worker") == 3 and len(results) == 8


@pytest.mark.parametrize("token,message", [
    ("docker swarm join --token x", "not a pichat join token"),
    ("pichat1.!!!notbase64", "damaged"),
    ("pichat1." + "e30", "damaged"),  # {}
    ("pichat1." + "x" * 5000, "not a pichat join token"),
])
def test_a_damaged_token_says_what_is_wrong(token, message):
    with pytest.raises(InviteRefused, match=message):
        parse(token)


def test_admitted_keys_are_allow_list_entries_listed_and_revoked(keys):
    public = zmq.auth.create_certificates(keys.parent, "pi7")[0]
    key = zmq.auth.load_certificate(public)[0].decode()
    path = admit(keys, "worker", "pi7", key)
    assert zmq.auth.load_certificate(path)[0].decode() == key  # what the router reads
    assert ("worker", "pi7") in members(keys)
    other = zmq.auth.load_certificate(zmq.auth.create_certificates(keys.parent, "x")[0])[0]
    with pytest.raises(InviteRefused, match="taken"):
        admit(keys, "worker", "pi7", other.decode())
    with pytest.raises(InviteRefused, match="usable name"):
        admit(keys, "worker", "../router", key)
    assert revoke(keys, "pi7") == ["worker"]
    assert ("worker", "pi7") not in members(keys)
    with pytest.raises(PichatError, match="no admitted key"):
        revoke(keys, "pi7")


def new_key(keys, name: str) -> str:
    return zmq.auth.load_certificate(
        zmq.auth.create_certificates(keys.parent, name)[0])[0].decode()


def test_a_right_token_with_a_name_or_key_that_cannot_be_admitted_uses_nothing(keys):
    made = invite(keys, role="client", addresses=ADDRESS, router_key=router_key(keys))
    key = new_key(keys, "laptop")
    taken = new_key(keys, "taken")
    admit(keys, "client", "desk", taken)
    graveyard = new_key(keys, "old")
    admit(keys, "client", "gone", graveyard)
    revoke(keys, "gone")
    for name, joining, why in [
            ("lap\ntop", key, "usable name"), ("../router", key, "usable name"),
            ("", key, "usable name"), ("x" * 65, key, "usable name"),
            (".hidden", key, "usable name"), ("lap top", key, "usable name"),
            ("desk", key, "taken by another key"),
            ("gone", key, "revoked"),  # a revoked name, with a new key
            ("fresh", graveyard, "key was revoked"),  # a revoked key, with a new name
            ("laptop", "x" * 39, "not a CURVE public key"),
            ("laptop", "\u00e9" * 40, "not a CURVE public key"),
            ("laptop", "#" * 40, "not a CURVE public key")]:
        with pytest.raises(InviteRefused, match=why):
            join(keys, made.id, made.secret, name, joining)
    # Every refusal above left the token's one use: it admits the right name now, once.
    assert join(keys, made.id, made.secret, "laptop", key)[0] == "client"
    assert ("client", "laptop") in members(keys)
    with pytest.raises(InviteRefused, match="already used"):
        join(keys, made.id, made.secret, "laptop2", new_key(keys, "l2"))


def test_a_revoked_name_or_key_is_never_admitted_again_however_its_file_comes_back(keys):
    """An owner is a key: after `pichat keys revoke laptop`, nobody inherits "laptop" (its
    stored conversations are owned by that name), and the revoked key is let in under no
    name, whether by join, by keygen, or by a key file copied into the allow-list."""
    key = new_key(keys, "laptop")
    admit(keys, "client", "laptop", key)
    allow = AllowList(keys / "clients", "clients", keys)
    assert allow.lookup(key.encode(), 0.0) == "laptop"
    assert revoke(keys, "laptop") == ["client"]
    tomb = keys / "revoked" / "clients" / "laptop.key"
    assert zmq.auth.load_certificate(tomb)[0].decode() == key  # kept, not deleted
    assert allow.lookup(key.encode(), 1.0) is None
    with pytest.raises(InviteRefused, match="revoked"):
        admit(keys, "client", "laptop", new_key(keys, "thief"))
    with pytest.raises(InviteRefused, match="revoked"):
        admit(keys, "client", "laptop", key)  # the same key back: no either
    with pytest.raises(InviteRefused, match="key was revoked"):
        admit(keys, "worker", "pi-laptop", key)  # nor under another role and name
    # An allow-list entry that a tombstone names is skipped, however it got there (a copy
    # by hand, a backup restored): under the revoked name with a new key, or the revoked
    # key under a new name.
    thief = new_key(keys, "thief2")
    (keys / "clients" / "laptop.key").write_text(
        f'metadata\ncurve\n    public-key = "{thief}"\n')
    (keys / "clients" / "renamed.key").write_text(tomb.read_text())
    assert allow.lookup(thief.encode(), 2.0) is None
    assert allow.lookup(key.encode(), 2.1) is None
    assert "laptop" not in allow.names() and "renamed" not in allow.names()
    # keygen fills in what is missing, but not a revoked entry.
    revoke(keys, "client")
    keygen(keys)
    assert not (keys / "clients" / "client.key").exists()
    assert allow.lookup((keys / "client.key").read_text().split('"')[1].encode(), 3.0) is None
    # A tombstone that cannot be read still revokes its name.
    (keys / "revoked" / "clients" / "broken.key").write_text("")
    with pytest.raises(InviteRefused, match="revoked"):
        admit(keys, "client", "broken", new_key(keys, "b"))


def test_files_planted_where_the_invitations_are_kept_are_not_followed(keys):
    """`sudo pichat invite` runs as root in a folder the router's user can write: a
    symlink planted as the lock (or as a temporary file) must not make root create,
    truncate or chmod what it points at."""
    made = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys))
    target = keys.parent / "precious"
    target.write_text("keep me")
    os.chmod(target, 0o600)
    lock = keys / "invites" / ".lock"
    lock.unlink()
    lock.symlink_to(target)
    with pytest.raises(OSError):
        invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys))
    with pytest.raises(OSError):
        redeem(keys, made.id, made.secret)
    assert target.read_text() == "keep me" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    lock.unlink()
    # Temporary files have fresh names: one planted at a guessable name is not written.
    for guess in (f"{made.id}.tmp", f".{made.id}.json.tmp", "pi4.tmp"):
        (keys / "invites" / guess).symlink_to(target)
        (keys / "workers" / guess).symlink_to(target)
    assert redeem(keys, made.id, made.secret) == "worker"
    admit(keys, "worker", "pi4", new_key(keys, "pi4"))
    assert target.read_text() == "keep me"


def test_a_shared_keys_directory_is_written_for_its_group_others_for_the_owner(keys):
    """make install-systemd's router keys: `sudo pichat invite` (root) and the router (a
    dynamic user of group pichat) must both read and redeem invitations and admit keys."""
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    private = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys))
    redeem(keys, private.id, private.secret)  # writes the lock
    assert mode(keys / "invites" / ".lock") == 0o600
    assert mode(keys / "invites") == 0o700

    shared = keys.parent / "shared"
    keygen(shared)
    for folder in (shared, shared / "workers"):
        os.chmod(folder, 0o2770)
    old = os.umask(0o077)  # the unit's UMask: explicit modes must not be narrowed
    try:
        made = invite(shared, role="worker", addresses=ADDRESS, router_key=router_key(shared),
                      uses=2)
        redeem(shared, made.id, made.secret)
        key = zmq.auth.load_certificate(shared / "worker.key")[0].decode()
        admitted = admit(shared, "worker", "pi3", key)
    finally:
        os.umask(old)
    assert mode(shared / "invites") == 0o2770
    assert mode(shared / "invites" / f"{made.id}.json") == 0o660
    assert mode(shared / "invites" / ".lock") == 0o660
    assert mode(admitted) == 0o660


def test_a_joined_pis_router_file_is_kept_merged_and_a_damaged_one_is_an_error(tmp_path):
    assert stored_router(tmp_path, "workers") is None
    remember_router(tmp_path, {"workers": "tcp://10.0.0.2:5556", "clients": "tcp://10.0.0.2:5555"})
    remember_router(tmp_path, {"workers": "tcp://10.0.0.9:5556"})  # found again elsewhere
    assert stored_router(tmp_path, "workers") == "tcp://10.0.0.9:5556"
    assert stored_router(tmp_path, "clients") == "tcp://10.0.0.2:5555"
    assert stored_router(tmp_path, "name") is None  # kept nothing of the kind
    (tmp_path / "router.json").write_text("{not json")
    with pytest.raises(PichatError, match="pichat join"):
        stored_router(tmp_path, "workers")


def test_a_joiner_that_could_not_reach_what_it_joins_is_refused_and_uses_nothing(keys):
    """A router serving workers on 127.0.0.1 only handed a Pi elsewhere a worker endpoint
    it could never reach: its READY went into the void. The router refuses such a join,
    saying which option to change, and the token keeps its use."""
    from types import SimpleNamespace

    from pichat.router.daemon.joins import JoinDesk

    router = SimpleNamespace(workers_endpoint="tcp://127.0.0.1:5576",
                             clients_endpoint="tcp://0.0.0.0:5577",
                             config=SimpleNamespace(log_repeat_window=60.0))
    desk = JoinDesk(router)
    made = invite(keys, role="worker", addresses=ADDRESS, router_key=router_key(keys))
    key = new_key(keys, "pi2")
    for peer in ("192.168.1.20", "10.0.0.7", "fe80::1"):
        with pytest.raises(InviteRefused, match="--workers-bind tcp://0.0.0.0:5576"):
            join(keys, made.id, made.secret, "pi2", key,
                 check=lambda role, peer=peer: desk._reachable(role, peer))
    assert ("worker", "pi2") not in members(keys)
    # From the router's own host (a loopback address), or a client (its endpoint is on
    # every interface): fine, and now the use is taken.
    desk._reachable("client", "192.168.1.20")
    assert join(keys, made.id, made.secret, "pi2", key,
                check=lambda role: desk._reachable(role, "127.0.0.1"))[0] == "worker"
    with pytest.raises(InviteRefused, match="already used"):
        join(keys, made.id, made.secret, "pi3", new_key(keys, "pi3"))
