"""CurveZMQ keys, ZAP allow-lists, secure-by-default binds, and bounds."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Cluster, Proc, wait_for_file
from pichat.client import Client
from pichat.config import ClientConfig, RouterConfig
from pichat.errors import ErrorCode, PichatError, RequestFailed, RouterUnavailable
from pichat.protocol import ChatMessage, Sampling
from pichat.router.daemon.router import Router
from pichat.security import is_loopback, keygen, resolve_keys

HI = [ChatMessage("user", "hello")]


def test_keygen_writes_a_complete_directory_and_keeps_existing_keys(tmp_path):
    keys = tmp_path / "keys"
    written = {p.relative_to(keys).as_posix() for p in keygen(keys, workers=("pi2",))}
    assert written == {
        "router.key", "router.key_secret", "worker.key", "worker.key_secret", "pi2.key",
        "pi2.key_secret", "client.key", "client.key_secret", "workers/worker.key",
        "workers/pi2.key", "clients/client.key", "api-keys"}
    assert (keys / "router.key_secret").stat().st_mode & 0o077 == 0
    assert (keys / "api-keys").read_text().count("pichat-") == 1
    before = (keys / "router.key_secret").read_bytes()
    assert keygen(keys) == []  # nothing new
    assert (keys / "router.key_secret").read_bytes() == before
    assert {p.name for p in keygen(keys, clients=("laptop",))} == {
        "laptop.key", "laptop.key_secret"}


def test_resolving_the_keys_option(tmp_path, monkeypatch):
    assert resolve_keys("off") is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_keys(None) is None  # no default directory: no keys
    with pytest.raises(PichatError, match="pichat keygen --keys"):
        resolve_keys(str(tmp_path / "nowhere"))
    keygen(tmp_path / ".config/pichat/keys")
    assert resolve_keys(None).directory == tmp_path / ".config/pichat/keys"


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5", True),
    ("ipc:///tmp/x.ipc", True), ("127.0.0.1:8080", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://192.168.1.5:5555", False),
    ("0.0.0.0:8080", False), ("tcp://pi1.local:5555", False),
])
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


@pytest.mark.parametrize("overrides, mentions", [
    ({"clients_bind": "tcp://0.0.0.0:{p}"}, "without keys"),
    ({"workers_bind": "tcp://*:{p}"}, "without keys"),
    ({"http": "0.0.0.0:{p}"}, "without an API key"),
])
async def test_the_router_refuses_an_open_port_without_keys(overrides, mentions):
    # It refuses before it binds anything: port 0 everywhere.
    settings = {"clients_bind": "tcp://127.0.0.1:0", "workers_bind": "tcp://127.0.0.1:0",
                "http": ""}
    settings.update({k: v.format(p=0) for k, v in overrides.items()})
    config = RouterConfig(**settings)
    with pytest.raises(PichatError, match=mentions):
        await Router(config).run()


def test_the_cli_says_how_to_secure_it_and_insecure_overrides(tmp_path):
    argv = [sys.executable, "-m", "pichat", "router", "--clients-bind",
            "tcp://0.0.0.0:0", "--workers-bind", "tcp://127.0.0.1:0",
            "--http", "off"]
    refused = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "pichat keygen" in refused.stderr
    ready = tmp_path / "ready"
    proc = Proc("insecure", [*argv[3:], "--insecure", "--ready-file", str(ready)], tmp_path)
    try:
        assert json.loads(wait_for_file(ready, proc))["clients"].startswith("tcp://0.0.0.0:")
    finally:
        assert proc.stop() == 0
        proc.close()


@pytest.fixture
def keys(tmp_path) -> Path:
    keygen(tmp_path / "keys", workers=("pi2",), clients=("laptop",))
    return tmp_path / "keys"


async def secured_cluster(cluster: Cluster, keys: Path) -> None:
    cluster.router("--keys", str(keys))
    cluster.worker("w1", "--keys", str(keys))
    cluster.worker("w2", "--keys", str(keys), "--key-name", "pi2")


def client(cluster: Cluster, keys: Path | None, name: str = "client", **kw) -> Client:
    return Client(ClientConfig(router=cluster.client_endpoint,
                               keys=resolve_keys(str(keys)) if keys else None, key_name=name,
                               **kw))


async def test_a_secured_cluster_answers_clients_with_admitted_keys(cluster: Cluster, keys: Path):
    await secured_cluster(cluster, keys)
    async with client(cluster, keys) as c:
        for _ in range(100):
            status = await c.status()
            if len(status["workers"]) == 2:
                break
            await asyncio.sleep(0.1)
        assert {w["name"] for w in status["workers"]} == {"w1", "w2"}
        assert status["security"]["curve"] is True
        reply = await c.chat(HI, sampling=Sampling(temperature=0))
        assert reply.text
    async with client(cluster, keys, "laptop") as c:
        assert (await c.chat(HI)).text


async def test_a_plain_client_hears_nothing_and_says_so(cluster: Cluster, keys: Path):
    await secured_cluster(cluster, keys)
    async with client(cluster, None, silence_timeout=1.0) as c:
        with pytest.raises(RouterUnavailable, match="no answer|no connection"):
            await c.chat(HI)


async def test_an_unknown_key_is_refused_logged_and_admitted_once_listed(
        cluster: Cluster, keys: Path, tmp_path):
    router = cluster.router("--keys", str(keys))
    cluster.worker("w1", "--keys", str(keys))
    # A key pair made elsewhere, with the same router.key but not on the router's lists.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    shutil.copy(keys / "router.key", stranger / "router.key")
    keygen(stranger, api_key=False)
    shutil.copy(keys / "router.key", stranger / "router.key")  # keygen kept the copied key
    async with client(cluster, stranger, silence_timeout=1.5) as c:
        with pytest.raises(RouterUnavailable, match="does not accept this client's key"):
            await c.chat(HI)
    assert "refused a client connection from 127.0.0.1" in await router.wait_output(
        "refused a client connection from 127.0.0.1")
    async with client(cluster, keys) as c:
        assert (await c.status())["security"]["refused"]["clients"] >= 1
    # Admit it by dropping its public key in the allow-list: no restart needed.
    shutil.copy(stranger / "client.key", keys / "clients" / "stranger.key")
    async with client(cluster, stranger) as c:
        assert (await c.chat(HI)).text


async def test_a_worker_with_an_unknown_key_is_not_registered(cluster: Cluster, keys: Path,
                                                              tmp_path):
    router = cluster.router("--keys", str(keys))
    rogue = tmp_path / "rogue"
    keygen(rogue, api_key=False)
    shutil.copy(keys / "router.key", rogue / "router.key")
    impostor = cluster.worker("impostor", "--keys", str(rogue))
    assert "refused a worker connection" in await router.wait_output(
        "refused a worker connection")
    async with client(cluster, keys) as c:
        assert (await c.status())["workers"] == []
    assert "does not accept this worker's key" in await impostor.wait_output(
        "does not accept this worker's key")


async def test_an_oversized_conversation_is_refused_and_counted(cluster: Cluster):
    cluster.router("--max-prompt-chars", "100")
    cluster.worker("w1")
    await cluster.wait_workers(1)
    async with cluster.client() as c:
        with pytest.raises(RequestFailed, match="at most 100") as info:
            await c.chat([ChatMessage("user", "x" * 101)])
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert (await c.chat([ChatMessage("user", "x" * 50)])).text
        status = await c.status()
    assert status["requests"]["rejected_prompt_too_large"] == 1


async def test_keygen_then_router_is_secure_on_every_interface(cluster: Cluster, keys: Path):
    """`pichat keygen` + `pichat router` on all interfaces: CURVE for ZeroMQ, and the
    HTTP face takes its API key from the keys directory."""
    import aiohttp

    cluster.router("--keys", str(keys), host="0.0.0.0")
    cluster.worker("w1", "--keys", str(keys))
    cluster.keys = keys
    api_key = (keys / "api-keys").read_text().split()[-1]
    await cluster.wait_workers(1)
    async with client(cluster, keys) as c:
        assert (await c.chat(HI)).text
    async with aiohttp.ClientSession() as http:
        url = f"{cluster.http_url}/v1/models"
        async with http.get(url) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {api_key}"}) as r:
            assert r.status == 200
