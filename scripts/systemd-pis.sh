# shellcheck shell=bash disable=SC2154  # pis, net: set by the script that sources this
# Pis played by Debian containers with systemd as PID 1 on one Docker network, for
# scripts/systemd-e2e.sh and scripts/systemd-ha-e2e.sh (sourced; they set `pis` and `net`,
# and may set `subnet` and `ips`, the containers' addresses in the same order).
# Offline: pip installs from docker/wheelhouse and reuses this machine's llama-cpp-python
# wheel cache; the workers' state directories are seeded with this machine's model.

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here" || exit 1
models=${PICHAT_MODEL_DIR:-$HOME/.cache/pichat/models}
wheels=${PICHAT_WHEEL_CACHE:-$HOME/.cache/pichat/wheels}
started_engine=""

step() { printf '\n== %s [%s]\n' "$*" "$(date +%T)"; }
fail() {
    echo "FAIL: $*" >&2
    for pi in "${pis[@]}"; do
        docker exec "$pi" journalctl -u 'pichat-*' -u etcd -u keepalived --no-pager -n 60 >&2 || true
    done
    exit 1
}
cleanup() {  # PICHAT_E2E_KEEP=1 leaves the containers to look into
    set +e
    [ -n "${PICHAT_E2E_KEEP:-}" ] && return
    docker rm -f "${pis[@]}" >/dev/null 2>&1
    docker network rm "$net" >/dev/null 2>&1
    if [ -n "$started_engine" ]; then scripts/docker-engine.sh stop; fi
}

boot_pis() {
    step "Docker engine and a systemd image"
    docker info >/dev/null 2>&1 || started_engine=yes
    DOCKER_HOST=$(scripts/docker-engine.sh start)
    export DOCKER_HOST
    scripts/docker-base-image.sh linux/amd64 systemd
    scripts/docker-wheelhouse.sh linux/amd64 >/dev/null

    step "boot systemd in ${#pis[@]} containers (${#pis[@]} Pis on one network)"
    docker rm -f "${pis[@]}" >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
    docker network create ${subnet:+--subnet "$subnet"} "$net" >/dev/null
    local i=0 pi state
    for pi in "${pis[@]}"; do
        # All capabilities but CAP_SYS_RESOURCE (which a sandboxed host may not grant); no
        # seccomp.
        docker run -d --name "$pi" --hostname "$pi" --network "$net" \
            ${ips:+--ip "${ips[$i]}"} --cap-add ALL \
            --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined --cgroupns=host \
            -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
            -v "$here":/src:ro -v "$wheels":/wheels:ro -v "$models":/seed:ro \
            local/debian-systemd:bookworm /lib/systemd/systemd >/dev/null
        i=$((i + 1))
    done
    for pi in "${pis[@]}"; do
        for _ in $(seq 60); do
            state=$(on "$pi" systemctl is-system-running 2>/dev/null || true)
            case "$state" in running|degraded) break ;; esac
            sleep 1
        done
        echo "$pi systemd: $state"
    done
}

on() { local pi=$1; shift; docker exec -e PICHAT_KEYS=/etc/pichat/keys "$pi" "$@"; }

install() {  # pi, make arguments
    local pi=$1; shift
    on "$pi" bash -c "rm -rf /tmp/pichat && cp -a /src /tmp/pichat && cd /tmp/pichat &&
        rm -rf .venv docker/wheelhouse/linux-arm64 &&
        PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/docker/wheelhouse/linux-amd64 PICHAT_WHEEL_CACHE=/wheels \
        PICHAT_FETCH_MODEL=no make install-systemd $*"
    on "$pi" bash -c 'sed -i "s|^PICHAT_THREADS=.*|PICHAT_THREADS=1|" /etc/pichat/pichat.env &&
        mkdir -p -m 0700 /var/lib/private && mkdir -p /var/lib/private/pichat/models &&
        cp -a /seed/*.gguf /seed/*.sha256.json /var/lib/private/pichat/models/'
}

workers() {  # pi: the names of the workers registered with the router on that Pi
    on "$1" /opt/pichat/venv/bin/pichat status --json 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join(sorted(w["name"] for w in json.load(sys.stdin)["workers"])))' 2>/dev/null || true
}
