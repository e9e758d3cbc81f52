#!/usr/bin/env bash
# The systemd path end to end (`make systemd-e2e`; needs root and a Docker engine, which it
# starts if none answers): two Debian containers with systemd as PID 1 on one Docker
# network play two Pis. On pi1 `make install-systemd` (the router's Pi: keys made there),
# pichat-router and pichat-worker started with the shipped units (hardening included);
# `sudo pichat invite` there; on pi2 `make install-systemd PICHAT_JOIN=TOKEN` (joins: a key
# pair of its own, no other secret) and pichat-worker with no router configured. A prompt
# is answered, pi2's worker among those registered; both stop cleanly.
# Offline: pip installs from docker/wheelhouse and reuses this machine's llama-cpp-python
# wheel cache; the workers' state directories are seeded with this machine's model.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
models=${PICHAT_MODEL_DIR:-$HOME/.cache/pichat/models}
wheels=${PICHAT_WHEEL_CACHE:-$HOME/.cache/pichat/wheels}
net=pichat-systemd-e2e
pis=(pi1 pi2)
started_engine=""

step() { printf '\n== %s\n' "$*"; }
fail() {
    echo "FAIL: $*" >&2
    for pi in "${pis[@]}"; do
        docker exec "$pi" journalctl -u 'pichat-*' --no-pager -n 60 >&2 || true
    done
    exit 1
}
cleanup() {
    set +e
    docker rm -f "${pis[@]}" >/dev/null 2>&1
    docker network rm "$net" >/dev/null 2>&1
    if [ -n "$started_engine" ]; then scripts/docker-engine.sh stop; fi
}
trap cleanup EXIT

step "Docker engine and a systemd image"
docker info >/dev/null 2>&1 || started_engine=yes
DOCKER_HOST=$(scripts/docker-engine.sh start)
export DOCKER_HOST
scripts/docker-base-image.sh linux/amd64 systemd
scripts/docker-wheelhouse.sh linux/amd64 >/dev/null

step "boot systemd in two containers (two Pis on one network)"
docker rm -f "${pis[@]}" >/dev/null 2>&1 || true
docker network rm "$net" >/dev/null 2>&1 || true
docker network create "$net" >/dev/null
for pi in "${pis[@]}"; do
    # All capabilities but CAP_SYS_RESOURCE (which a sandboxed host may not grant); no seccomp.
    docker run -d --name "$pi" --hostname "$pi" --network "$net" --cap-add ALL \
        --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined --cgroupns=host \
        -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
        -v "$here":/src:ro -v "$wheels":/wheels:ro -v "$models":/seed:ro \
        local/debian-systemd:bookworm /lib/systemd/systemd >/dev/null
done
on() { local pi=$1; shift; docker exec -e PICHAT_KEYS=/etc/pichat/keys "$pi" "$@"; }
for pi in "${pis[@]}"; do
    for _ in $(seq 60); do
        state=$(on "$pi" systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 1
    done
    echo "$pi systemd: $state"
done

install() {  # pi, make arguments
    local pi=$1; shift
    on "$pi" bash -c "cp -a /src /tmp/pichat && cd /tmp/pichat && rm -rf .venv docker/wheelhouse/linux-arm64 &&
        PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/docker/wheelhouse/linux-amd64 PICHAT_WHEEL_CACHE=/wheels \
        PICHAT_FETCH_MODEL=no make install-systemd $*"
    on "$pi" bash -c 'sed -i "s|^PICHAT_THREADS=.*|PICHAT_THREADS=1|" /etc/pichat/pichat.env &&
        mkdir -p -m 0700 /var/lib/private && mkdir -p /var/lib/private/pichat/models &&
        cp -a /seed/*.gguf /seed/*.sha256.json /var/lib/private/pichat/models/'
}
workers() {
    on pi1 /opt/pichat/venv/bin/pichat status --json 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join(sorted(w["name"] for w in json.load(sys.stdin)["workers"])))' 2>/dev/null || true
}

step "pi1: make install-systemd (the router's Pi), start the router and a worker"
install pi1
on pi1 systemctl start pichat-router pichat-worker

step "pi1: sudo pichat invite; pi2: make install-systemd PICHAT_JOIN=TOKEN"
token=$(on pi1 /opt/pichat/venv/bin/pichat invite --keys /etc/pichat/keys --address tcp://pi1:5557)
install pi2 "PICHAT_JOIN=$token"
on pi1 /opt/pichat/venv/bin/pichat keys list --keys /etc/pichat/keys | grep -q 'worker  pi2' ||
    fail "the router did not admit pi2"
router_secret=$(on pi1 sed -n 's/.*secret-key = "\(.*\)"/\1/p' /etc/pichat/keys/router.key_secret)
on pi2 ls -la /etc/pichat/keys
if on pi2 grep -rqF -- "$router_secret" /etc/pichat /var/lib/private/pichat 2>/dev/null; then
    fail "pi2 holds the router's secret key"
fi
[ "$(on pi2 sh -c 'ls /etc/pichat/keys/*.key_secret')" = /etc/pichat/keys/worker.key_secret ] ||
    fail "pi2 holds another secret key than its own"
on pi2 systemctl start pichat-worker

for _ in $(seq 120); do
    case " $(workers) " in *" pi2 "*) [ "$(workers | wc -w)" -ge 2 ] && break ;; esac
    sleep 1
done
echo "registered workers: $(workers)"
case " $(workers) " in *" pi2 "*) ;; *) fail "pi2's worker did not register" ;; esac
[ "$(workers | wc -w)" -ge 2 ] || fail "pi1's worker did not register"
on pi1 /opt/pichat/venv/bin/pichat status

step "a prompt"
answer=$(on pi1 /opt/pichat/venv/bin/pichat ask "Hello, how are you?" --max-tokens 60 --temperature 0 --stats)
echo "$answer"
[ -n "$(echo "$answer" | tr -d '[:space:]')" ] || fail "empty answer"

step "running as dynamic users, hardened"
# shellcheck disable=SC2016  # expanded inside the container
on pi1 bash -c 'for u in pichat-router pichat-worker; do
    pid=$(systemctl show -p MainPID --value $u); echo "$u: pid $pid, user $(ps -o user= -p $pid), $(systemctl is-active $u)"; done'
on pi1 systemd-analyze security pichat-router pichat-worker --no-pager | tail -3

step "stop cleanly"
on pi2 systemctl stop pichat-worker
on pi1 systemctl stop pichat-worker pichat-router
for unit in pi1:pichat-router pi1:pichat-worker pi2:pichat-worker; do
    result=$(on "${unit%%:*}" systemctl show -p Result --value "${unit#*:}")
    [ "$result" = success ] || fail "$unit stopped with result $result"
done
echo "all stopped with result success"
step "systemd-e2e passed"
