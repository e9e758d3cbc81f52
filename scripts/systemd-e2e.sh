#!/usr/bin/env bash
# The systemd path end to end (`make systemd-e2e`; needs root and a Docker engine, which it
# starts if none answers): boot a Debian container with systemd as PID 1, run
# `make install-systemd` in it, start pichat-router and pichat-worker with the shipped
# units (hardening included), answer a prompt, and stop them cleanly.
# Offline: pip installs from docker/wheelhouse and reuses this machine's llama-cpp-python
# wheel cache; the worker's state directory is seeded with this machine's model.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
models=${PICHAT_MODEL_DIR:-$HOME/.cache/pichat/models}
wheels=${PICHAT_WHEEL_CACHE:-$HOME/.cache/pichat/wheels}
name=pichat-systemd-e2e
started_engine=""

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; docker exec "$name" journalctl -u 'pichat-*' --no-pager -n 60 >&2 || true; exit 1; }
cleanup() {
    set +e
    docker rm -f "$name" >/dev/null 2>&1
    if [ -n "$started_engine" ]; then scripts/docker-engine.sh stop; fi
}
trap cleanup EXIT

step "Docker engine and a systemd image"
docker info >/dev/null 2>&1 || started_engine=yes
DOCKER_HOST=$(scripts/docker-engine.sh start)
export DOCKER_HOST
scripts/docker-base-image.sh linux/amd64 systemd
scripts/docker-wheelhouse.sh linux/amd64 >/dev/null

step "boot systemd in a container"
docker rm -f "$name" >/dev/null 2>&1 || true
# All capabilities but CAP_SYS_RESOURCE (which a sandboxed host may not grant); no seccomp.
docker run -d --name "$name" --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --cgroupns=host \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
    -v "$here":/src:ro -v "$wheels":/wheels:ro -v "$models":/seed:ro \
    local/debian-systemd:bookworm /lib/systemd/systemd >/dev/null
ctr() { docker exec -e PICHAT_KEYS=/etc/pichat/keys "$name" "$@"; }
for _ in $(seq 60); do
    state=$(ctr systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 1
done
echo "systemd: $state"

step "make install-systemd"
ctr bash -c 'cp -a /src /tmp/pichat && cd /tmp/pichat && rm -rf .venv docker/wheelhouse/linux-arm64 &&
    PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/docker/wheelhouse/linux-amd64 PICHAT_WHEEL_CACHE=/wheels \
    PICHAT_FETCH_MODEL=no make install-systemd'

step "configure, seed the model, start"
ctr bash -c 'sed -i "s|^PICHAT_THREADS=.*|PICHAT_THREADS=1|" /etc/pichat/pichat.env &&
    mkdir -p -m 0700 /var/lib/private && mkdir -p /var/lib/private/pichat/models &&
    cp -a /seed/*.gguf /seed/*.sha256.json /var/lib/private/pichat/models/'
ctr systemctl start pichat-router pichat-worker
for _ in $(seq 120); do
    n=$(ctr /opt/pichat/venv/bin/pichat status --json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["workers"]))' 2>/dev/null || echo 0)
    [ "$n" -ge 1 ] && break
    sleep 1
done
[ "$n" -ge 1 ] || fail "the worker did not register"
ctr /opt/pichat/venv/bin/pichat status

step "a prompt"
answer=$(ctr /opt/pichat/venv/bin/pichat ask "Hello, how are you?" --max-tokens 60 --temperature 0 --stats)
echo "$answer"
[ -n "$(echo "$answer" | tr -d '[:space:]')" ] || fail "empty answer"

step "running as a dynamic user, hardened"
# shellcheck disable=SC2016  # expanded inside the container
ctr bash -c 'for u in pichat-router pichat-worker; do
    pid=$(systemctl show -p MainPID --value $u); echo "$u: pid $pid, user $(ps -o user= -p $pid), $(systemctl is-active $u)"; done'
ctr systemd-analyze security pichat-router pichat-worker --no-pager | tail -3

step "stop cleanly"
ctr systemctl stop pichat-worker pichat-router
for u in pichat-router pichat-worker; do
    result=$(ctr systemctl show -p Result --value "$u")
    [ "$result" = success ] || fail "$u stopped with result $result"
done
echo "both stopped with result success"
step "systemd-e2e passed"
