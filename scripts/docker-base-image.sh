#!/usr/bin/env bash
# Make local base images from Debian packages, for a machine that cannot pull from a
# registry (Docker Hub unreachable): debootstrap a minimal Debian bookworm with Python,
# then `docker import` it.
#   local/debian-py:bookworm         runtime: python3, venv, libgomp1
#   local/debian-py-build:bookworm   the same plus g++, make, cmake (for the build stage)
#   local/debian-systemd:bookworm    with the flavour "systemd": systemd as init, make,
#                                    python3, etcd-server, keepalived (scripts/systemd-e2e.sh,
#                                    scripts/systemd-ha-e2e.sh)
# Usage: sudo scripts/docker-base-image.sh [linux/amd64|linux/arm64] [systemd]
# (arm64 on an x86 machine needs qemu-user-static and binfmt_misc; ~6 minutes.)
# Env: DOCKER (default: docker), MIRROR (default http://deb.debian.org/debian), WORK dir.
set -euo pipefail

platform=${1:-linux/amd64}
arch=${platform#linux/}
docker=${DOCKER:-docker}
mirror=${MIRROR:-http://deb.debian.org/debian}
work=${WORK:-$(mktemp -d /tmp/pichat-rootfs.XXXXXX)}
suffix=$([ "$arch" = amd64 ] && echo "" || echo "-$arch")
runtime="local/debian-py:bookworm$suffix"
build="local/debian-py-build:bookworm$suffix"
packages=python3,python3-venv,ca-certificates,libgomp1

if [ "${2:-}" = systemd ]; then
    runtime="local/debian-systemd:bookworm$suffix"
    build=$runtime
    # etcd, keepalived, curl and ip: the HA layout (scripts/systemd-ha-e2e.sh).
    packages="$packages,systemd,systemd-sysv,dbus,make,procps,etcd-server,keepalived,curl,iproute2"
fi
relabel() {  # tag: some engines ignore `docker import --platform`; set the architecture
    local tag=$1 dir
    [ "$($docker image inspect "$tag" --format '{{.Architecture}}')" = "$arch" ] && return
    dir=$(mktemp -d)
    $docker save "$tag" | tar -C "$dir" -x
    python3 - "$dir" "$arch" <<'PY'
import json, sys
root, arch = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{root}/manifest.json"))
path = f"{root}/{manifest[0]['Config']}"
config = json.load(open(path))
config["architecture"] = arch
if arch == "arm64":
    config["variant"] = "v8"
json.dump(config, open(path, "w"))
PY
    tar -C "$dir" -c . | $docker load >/dev/null
    rm -rf "$dir"
}

if $docker image inspect "$runtime" "$build" >/dev/null 2>&1; then
    relabel "$runtime"
    relabel "$build"
    echo "$runtime and $build exist"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

make_image() {  # tag, extra packages
    local tag=$1 extra=$2 root="$work/${1//[:\/]/_}"
    echo "== debootstrap $tag ($arch)"
    debootstrap --arch="$arch" --variant=minbase --include="$packages$extra" bookworm "$root" "$mirror" \
        > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | $docker import --platform "$platform" - "$tag"
    rm -rf "$root"
}
$docker image inspect "$runtime" >/dev/null 2>&1 || make_image "$runtime" ""
$docker image inspect "$build" >/dev/null 2>&1 || make_image "$build" ",g++,make,cmake"
relabel "$runtime"
relabel "$build"
rmdir "$work" 2>/dev/null || true
