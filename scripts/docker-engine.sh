#!/usr/bin/env bash
# Make sure a Docker engine answers. Prints the DOCKER_HOST to use (empty: the default).
#   start: if `docker info` fails and this is root, start dockerd in the background with
#          its own data, exec root and socket under $PICHAT_DOCKER_DIR (/var/lib/pichat-docker)
#   stop:  stop the dockerd that `start` started (nothing else)
set -euo pipefail

dir=${PICHAT_DOCKER_DIR:-/var/lib/pichat-docker}
sock="unix://$dir/docker.sock"

case "${1:-start}" in
start)
    if docker info >/dev/null 2>&1; then echo "${DOCKER_HOST:-}"; exit 0; fi
    if DOCKER_HOST=$sock docker info >/dev/null 2>&1; then echo "$sock"; exit 0; fi
    command -v dockerd >/dev/null || { echo "no Docker engine and no dockerd (apt-get install docker.io)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "no Docker engine answers; starting one needs root" >&2; exit 1; }
    mkdir -p "$dir/data" "$dir/exec"
    dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "$sock" \
        --pidfile "$dir/dockerd.pid" > "$dir/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        if DOCKER_HOST=$sock docker info >/dev/null 2>&1; then echo "$sock"; exit 0; fi
        sleep 1
    done
    echo "dockerd did not start; see $dir/dockerd.log" >&2
    exit 1 ;;
stop)
    if [ -f "$dir/dockerd.pid" ]; then
        pid=$(cat "$dir/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        rm -f "$dir/dockerd.pid"
    fi ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
