"""Static checks of the deployment files (systemd units, Dockerfile, compose and Swarm
files, shell scripts), and the systemd installer staged into a temporary root.

The live paths (a Docker engine, a Swarm, systemd as PID 1) take minutes and root:
`make docker-e2e` and `make systemd-e2e`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pichat.cli import main

VENV_BIN = Path(sys.executable).parent
UNITS = ["pichat-router.service", "pichat-worker.service"]
SECURITY_THRESHOLD = 15
"""`systemd-analyze security` exposure, x10 (0 safest, 100 worst). Both units score 10
(1.0 "OK"): what remains is inherent to a network daemon (IPv4/6 and local sockets, the
host network, a root directory). 15 allows nothing else to be loosened unnoticed."""


def run(*argv: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kwargs)


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed here")
    return found


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> Path:
    """The units with ExecStart pointing at this checkout's pichat (verify wants it to exist)."""
    out = tmp_path_factory.mktemp("units")
    for unit in UNITS:
        text = (ROOT / "systemd" / unit).read_text()
        (out / unit).write_text(text.replace("/opt/pichat/venv/bin/pichat",
                                             str(VENV_BIN / "pichat")))
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_verify_without_warnings(units, unit):
    done = run(tool("systemd-analyze"), "verify", units / unit)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_are_hardened(units, unit):
    done = run(tool("systemd-analyze"), "security", "--offline=yes",
               f"--threshold={SECURITY_THRESHOLD}", units / unit)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)[1])
    assert exposure * 10 <= SECURITY_THRESHOLD


def test_units_run_as_a_dynamic_user_with_only_their_state_writable():
    worker = (ROOT / "systemd" / "pichat-worker.service").read_text()
    router = (ROOT / "systemd" / "pichat-router.service").read_text()
    for unit in (worker, router):
        for line in ("DynamicUser=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "NoNewPrivileges=yes", "Restart=on-failure", "After=network-online.target",
                     "EnvironmentFile=-/etc/pichat/pichat.env"):
            assert line in unit
    # The worker: its models and KV states; the router: the conversations it keeps.
    assert "StateDirectory=pichat\n" in worker and "StateDirectory=pichat-router\n" in router
    assert "PICHAT_MODEL_DIR=%S/pichat/models" in worker
    assert "PICHAT_DB=%S/pichat-router/conversations.db" in router
    # A static group named as a unit (its dynamic user's name) stops systemd from making
    # that user: the unit fails with 217/USER.
    names = {u.removesuffix(".service") for u in UNITS}
    for unit in (worker, router):
        groups = re.search(r"^SupplementaryGroups=(.*)$", unit, re.M)[1].split()
        assert not names & set(groups), groups


def option_envvars() -> set[str]:
    names = set()
    for command in main.commands.values():
        for param in command.params:
            if isinstance(param.envvar, str):
                names.add(param.envvar)
    return names | {"PICHAT_MODEL_DIR"}


@pytest.mark.parametrize("path", ["systemd/pichat.env", "docker/compose.yml", "docker/stack.yml",
                                  "docker/stack-ha.yml"])
def test_configuration_files_only_name_real_options(path):
    text = (ROOT / path).read_text()
    used = set(re.findall(r"\b(PICHAT_[A-Z_]+)\s*[:=]", text))
    assert used, path
    unknown = used - option_envvars() - {"PICHAT_IMAGE", "PICHAT_PUBLISH", "PICHAT_PUBLISH_PORT",
                                               "PICHAT_MODELS", "PICHAT_PUBLISH_HTTP",
                                               "PICHAT_PUBLISH_HTTP_PORT", "PICHAT_ROUTER_MEMORY",
                                               "PICHAT_WORKER_MEMORY", "PICHAT_PUBLISH2_PORT",
                                               "PICHAT_PUBLISH2_HTTP_PORT", "PICHAT_ETCD_IMAGE"}
    assert not unknown, f"{path} sets variables no option reads: {unknown}"


def test_dockerfile_passes_hadolint():
    done = run(tool("hadolint"), "docker/Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_a_base_image_argument():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'HEALTHCHECK' in text and '"pichat", "health"' in text
    assert re.search(r"^ARG BASE_IMAGE=", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert text.count("\nFROM ") == 2  # build stage + runtime stage


def test_compose_file_is_valid():
    tool("docker")
    done = run(ROOT / "scripts" / "compose.sh", "-f", "docker/compose.yml", "config", "-q",
               env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr


def test_swarm_stack_file_is_valid_and_uses_dnsrr():
    done = run(tool("docker"), "stack", "config", "-c", "docker/stack.yml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("endpoint_mode: dnsrr") == 2
    assert "mode: global" in done.stdout and "node.role == manager" in done.stdout


def test_the_swarm_ha_layout_puts_both_routers_on_etcd_and_every_worker_on_both():
    """docker/stack-ha.yml merged over docker/stack.yml (`make swarm-deploy HA=1`)."""
    import yaml

    nodes = {"PICHAT_ROUTER_NODE": "pi1", "PICHAT_ROUTER2_NODE": "pi2",
             "PICHAT_ETCD_NODE1": "pi1", "PICHAT_ETCD_NODE2": "pi2", "PICHAT_ETCD_NODE3": "pi3"}
    done = run(tool("docker"), "stack", "config", "-c", "docker/stack.yml", "-c",
               "docker/stack-ha.yml", env={**os.environ, **nodes})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    etcd = "etcd://etcd1:2379,etcd2:2379,etcd3:2379"
    for name, node in (("router", "pi1"), ("router2", "pi2")):
        router = services[name]
        assert router["environment"]["PICHAT_DB"] == etcd
        assert router["environment"]["PICHAT_KEYS"] == "/keys"
        assert f"node.hostname == {node}" in router["deploy"]["placement"]["constraints"]
    assert services["router"]["volumes"] != services["router2"]["volumes"]  # a copy each
    assert (services["worker"]["environment"]["PICHAT_WORKER_ROUTER"]
            == "tcp://router:5556,tcp://router2:5556")
    assert services["worker"]["environment"]["PICHAT_JOIN"] is not None
    for n, node in ((1, "pi1"), (2, "pi2"), (3, "pi3")):
        member = services[f"etcd{n}"]
        env = member["environment"]
        assert env["ETCD_NAME"] == f"etcd{n}" and env["ETCD_PRE_VOTE"] == "true"
        assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://etcd{n}:2380"
        assert "ports" not in member  # the overlay network only: nothing outside reaches it
        assert member["deploy"]["placement"]["constraints"] == [f"node.hostname == {node}"]
        assert env["ETCD_INITIAL_CLUSTER"] == ",".join(
            f"etcd{i}=http://etcd{i}:2380" for i in (1, 2, 3))


def test_shell_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / "bin" / "pichat",
                                                         ROOT / ".ci" / "run"]
    done = run(tool("shellcheck"), *scripts)
    assert done.returncode == 0, done.stdout


def test_install_systemd_stages_a_working_installation(tmp_path):
    """scripts/install-systemd.sh into a staging root (no root needed, nothing started)."""
    done = run(ROOT / "scripts" / "install-systemd.sh",
               env={**os.environ, "DESTDIR": str(tmp_path), "PICHAT_FETCH_MODEL": "no"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for unit in UNITS:
        assert (tmp_path / "etc/systemd/system" / unit).read_text() == (
            ROOT / "systemd" / unit).read_text()
    assert (tmp_path / "etc/pichat/pichat.env").is_file()
    assert (tmp_path / "etc/pichat/keys/router.key_secret").is_file()
    assert (tmp_path / "etc/pichat/keys/workers/worker.key").is_file()
    pichat = tmp_path / "opt/pichat/venv/bin/pichat"
    assert run(pichat, "--version").stdout.startswith("pichat, version")
    imported = run(tmp_path / "opt/pichat/venv/bin/python", "-c", "import llama_cpp, zmq")
    assert imported.returncode == 0, imported.stderr
    # A second run keeps the operator's configuration.
    (tmp_path / "etc/pichat/pichat.env").write_text("PICHAT_SLOTS=2\n")
    again = run(ROOT / "scripts" / "install-systemd.sh",
                env={**os.environ, "DESTDIR": str(tmp_path), "PICHAT_FETCH_MODEL": "no"})
    assert again.returncode == 0 and "keeping the existing" in again.stdout
    assert (tmp_path / "etc/pichat/pichat.env").read_text() == "PICHAT_SLOTS=2\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group takes root")
def test_on_the_routers_pi_a_workers_group_cannot_read_the_routers_secrets():
    """scripts/key-permissions.sh (what install-systemd runs) on a keys directory made by
    `pichat keygen`: a process in the services' group only (a worker's) reads
    the public keys and its own pair, never the router's secret, the client secret or
    api-keys; one in the router's group too reads them. Groups that exist here stand in
    for pichat and pichat-secrets."""
    import tempfile
    # Under a directory other users can pass through (pytest's own is root's only).
    top = Path(tempfile.mkdtemp(prefix="pichat-keys-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        check_key_groups(top / "keys")
    finally:
        shutil.rmtree(top)


def check_key_groups(keys: Path) -> None:
    made = run(VENV_BIN / "pichat", "keygen", "--keys", keys)
    assert made.returncode == 0, made.stderr
    (keys / "api-keys").write_text("pichat-secret\n")
    env = {**os.environ, "PICHAT_GROUP": "daemon", "PICHAT_ROUTER_GROUP": "adm"}
    done = run(ROOT / "scripts" / "key-permissions.sh", keys, env=env)
    assert done.returncode == 0, done.stderr
    units = {u: (ROOT / "systemd" / u).read_text() for u in UNITS}
    assert "SupplementaryGroups=pichat pichat-secrets\n" in units["pichat-router.service"]
    assert "SupplementaryGroups=pichat\n" in units["pichat-worker.service"]

    def reads(groups: str, path: Path) -> bool:
        return run("setpriv", "--reuid=nobody", f"--regid={groups.split(',')[0]}",
                   f"--groups={groups}", "cat", path).returncode == 0

    worker, router = "daemon", "daemon,adm"
    for name in ("router.key", "worker.key", "worker.key_secret"):
        assert reads(worker, keys / name), name
    for name in ("router.key_secret", "client.key_secret", "api-keys",
                 "workers/worker.key", "clients/client.key"):
        assert not reads(worker, keys / name), name
        assert reads(router, keys / name), name
    assert not reads("nogroup", keys / "router.key")  # nobody else reads anything
    for folder in ("workers", "clients", "invites", "revoked"):
        mode = (keys / folder).stat().st_mode
        assert mode & 0o7777 == 0o2770, folder


def install_ha(etc: Path, **env: str) -> subprocess.CompletedProcess:
    return run(ROOT / "scripts" / "install-ha.sh",
               env={**os.environ, "PICHAT_ETC": str(etc), "PICHAT_HA_NO_APT": "1", **env})


def this_hosts_address() -> str:
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    if not found:
        pytest.skip("this host has no address but loopback")
    return found[0]


def test_install_ha_configures_each_pi_for_its_part_and_keepalived_accepts_the_file(tmp_path):
    """The same `make install-ha` on every Pi: an etcd member, a router Pi, a worker only."""
    me, other, witness = this_hosts_address(), "10.250.0.12", "10.250.0.13"
    members = f"pi1={me} pi2={other} pi3={witness}"
    env = {"PICHAT_HA_ETCD": members, "PICHAT_HA_ROUTERS": f"{me} {other}",
           "PICHAT_HA_ADDRESS": "10.250.0.50/24",
           "PICHAT_HA_NAME": "pi1"}
    (tmp_path / "pichat").mkdir()
    shipped = (ROOT / "systemd" / "pichat.env").read_text()
    (tmp_path / "pichat" / "pichat.env").write_text(shipped)
    done = install_ha(tmp_path, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    etcd = dict(line.split("=", 1) for line in (tmp_path / "default/etcd").read_text().split("\n")
                if line and not line.startswith("#"))
    assert etcd["ETCD_NAME"] == "pi1"
    assert etcd["ETCD_INITIAL_CLUSTER"] == (f"pi1=http://{me}:2380,pi2=http://{other}:2380,"
                                            f"pi3=http://{witness}:2380")
    assert etcd["ETCD_LISTEN_CLIENT_URLS"] == f"http://{me}:2379,http://127.0.0.1:2379"
    assert etcd["ETCD_PRE_VOTE"] == "true" and etcd["ETCD_AUTO_COMPACTION_RETENTION"] == "1"
    allowed = re.search(r"^IPAddressAllow=(.*)$",
                        (tmp_path / "systemd/system/etcd.service.d/pichat.conf").read_text(),
                        re.M)[1].split()
    assert set(allowed) == {"localhost", me, other, witness, "10.250.0.50"}
    conf = tmp_path / "keepalived/keepalived.conf"
    text = conf.read_text()
    assert not re.search(r"@[A-Z]+@", text), text
    assert 'http://127.0.0.1:8080/health"' in text and "10.250.0.50/24" in text
    route = subprocess.run(["ip", "-o", "route", "get", "10.250.0.50"], capture_output=True,
                           text=True).stdout
    device = re.search(r" dev (\S+)", route)[1]
    assert f"interface {device}\n" in text  # the one reaching the address
    assert "virtual_router_id 77" in text
    checked = run(tool("keepalived"), "--config-test", "-f", conf)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = (tmp_path / "pichat/pichat.env").read_text()
    assert config.startswith(shipped)
    assert f"PICHAT_DB=etcd://{me}:2379,{other}:2379,{witness}:2379\n" in config
    assert "PICHAT_FLOATING_ADDRESS=10.250.0.50\n" in config
    assert f"PICHAT_WORKER_ROUTER=tcp://{me}:5556,tcp://{other}:5556\n" in config
    assert "After=etcd.service" in (
        tmp_path / "systemd/system/pichat-router.service.d/ha.conf").read_text()
    # Run again, or with the election's check: one block, the rest kept.
    assert install_ha(tmp_path, **env, PICHAT_HA_CHECK="floating").returncode == 0
    again = (tmp_path / "pichat/pichat.env").read_text()
    assert again == config and again.count("# --- high availability") == 1
    text = conf.read_text()
    assert "8080/health/floating" in text and "rise 1" in text and "advert_int 0.2" in text
    checked = run(tool("keepalived"), "--config-test", "-f", conf)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The witness (pi3): an etcd member, no keepalived, no router settings.
    witness_etc = tmp_path / "pi3"
    (witness_etc / "pichat").mkdir(parents=True)
    (witness_etc / "pichat/pichat.env").write_text(shipped)
    done = install_ha(witness_etc, **{**env, "PICHAT_HA_NAME": "pi3",
                                      "PICHAT_HA_ROUTERS": f"{other} 10.250.0.11"})
    assert done.returncode == 0, done.stderr
    assert "ETCD_NAME=pi3\n" in (witness_etc / "default/etcd").read_text()
    assert f"ETCD_LISTEN_PEER_URLS=http://{witness}:2380\n" in (
        witness_etc / "default/etcd").read_text()
    assert not (witness_etc / "keepalived").exists()
    config = (witness_etc / "pichat/pichat.env").read_text()
    assert "PICHAT_DB=" not in config and "PICHAT_FLOATING_ADDRESS" not in config
    assert f"PICHAT_WORKER_ROUTER=tcp://{other}:5556,tcp://10.250.0.11:5556\n" in config


@pytest.mark.parametrize("change, says", [
    ({"PICHAT_HA_ETCD": "pi1"}, "is not NAME=IP"),
    ({"PICHAT_HA_ETCD": "pi1=10.0.0.1;reboot"}, "is not NAME=IP"),
    ({"PICHAT_HA_ROUTERS": "pi1.local"}, "is not an IP address"),
    ({"PICHAT_HA_ADDRESS": "10.0.0.50"}, "must be IP/PREFIX"),
    ({"PICHAT_HA_VRID": "300"}, "must be 1-255"),
    ({"PICHAT_HA_CHECK": "ping"}, "must be floating or health"),
    ({"PICHAT_HA_ROUTERS": ""}, "needs PICHAT_HA_ETCD"),
])
def test_install_ha_refuses_what_it_cannot_use_and_writes_nothing(tmp_path, change, says):
    (tmp_path / "pichat").mkdir()
    (tmp_path / "pichat/pichat.env").write_text("PICHAT_SLOTS=2\n")
    env = {"PICHAT_HA_ETCD": "pi1=10.0.0.1 pi2=10.0.0.2 pi3=10.0.0.3",
           "PICHAT_HA_ROUTERS": "10.0.0.1 10.0.0.2", "PICHAT_HA_ADDRESS": "10.0.0.50/24",
           "PICHAT_HA_NAME": "pi1", **change}
    done = install_ha(tmp_path, **env)
    assert done.returncode != 0 and says in done.stderr, done.stderr
    assert (tmp_path / "pichat/pichat.env").read_text() == "PICHAT_SLOTS=2\n"
    assert not (tmp_path / "default").exists()
