#!/usr/bin/env bash
# pichat on arm64 (a Raspberry Pi's architecture) on an x86 machine, under qemu-user:
# in an arm64 Debian container, pip installs pichat and its dependencies (arm64 wheels
# from docker/wheelhouse/linux-arm64; llama-cpp-python compiled there, portably, once),
# then a router, a simulated worker and a llama.cpp worker (a tiny GGUF) answer prompts.
# The compiled llama-cpp-python wheel is kept (~/.cache/pichat/wheels/linux-arm64) and
# added to the wheelhouse, so `make build PLATFORM=linux/arm64` reuses it; then the arm64
# Docker image is built that way and its llama.cpp worker answers too.
# Needs root (binfmt_misc, a Docker engine); the first run compiles llama.cpp under
# emulation (tens of minutes), later runs take a few minutes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
cache=${PICHAT_WHEEL_CACHE:-$HOME/.cache/pichat/wheels}/linux-arm64
started_engine=""
step() { printf '\n== %s\n' "$*"; }
cleanup() { if [ -n "$started_engine" ]; then scripts/docker-engine.sh stop; fi; }
trap cleanup EXIT

step "qemu-user for arm64"
scripts/ensure-tools.sh update-binfmts:binfmt-support qemu-aarch64-static:qemu-user-static \
    debootstrap:debootstrap docker:docker.io dockerd:docker.io
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64
fi
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64

step "Docker engine, arm64 base image, arm64 wheelhouse, a tiny GGUF"
docker info >/dev/null 2>&1 || started_engine=yes
DOCKER_HOST=$(scripts/docker-engine.sh start)
export DOCKER_HOST
scripts/docker-base-image.sh linux/arm64
scripts/docker-wheelhouse.sh linux/arm64 >/dev/null
mkdir -p "$cache"
work=$(mktemp -d)
.venv/bin/python tests/tiny_model.py "$work/tiny.gguf" >/dev/null

step "install and run on arm64"
docker run --rm --platform linux/arm64 \
    -v "$here/docker/wheelhouse/linux-arm64":/wheelhouse:ro -v "$cache":/cache -v "$work":/work:ro \
    -v "$here/docker/wheelhouse/pichat":/wheelhouse-pichat:ro \
    local/debian-py-build:bookworm-arm64 bash -euo pipefail -c '
    echo "machine: $(uname -m), $(python3 --version)"
    python3 -m venv /venv
    if ! ls /cache/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "compiling llama-cpp-python for arm64 under emulation (once)..."
        CMAKE_ARGS="-DGGML_NATIVE=OFF" /venv/bin/pip wheel --quiet --no-index \
            --find-links /wheelhouse --no-deps --wheel-dir /cache llama-cpp-python
    fi
    /venv/bin/pip install --quiet --no-index --find-links /cache --find-links /wheelhouse \
        --find-links /wheelhouse-pichat pichat
    /venv/bin/pichat --version
    pichat=/venv/bin/pichat
    $pichat router --clients-bind tcp://127.0.0.1:5555 --workers-bind tcp://127.0.0.1:5556 --http 127.0.0.1:8080 --log-level warning &
    $pichat worker --backend sim --name arm64-sim --log-level warning &
    $pichat worker --backend llama --model /work/tiny.gguf --ctx 512 --threads 1 --name arm64-llama --log-level warning &
    for _ in $(seq 120); do
        n=$($pichat status --json 2>/dev/null | python3 -c "import json,sys; print(len(json.load(sys.stdin)[\"workers\"]))" 2>/dev/null || echo 0)
        [ "$n" -ge 2 ] && break; sleep 1
    done
    $pichat status
    echo "-- sim worker:";   $pichat ask "Hello from a Pi" --model sim --max-tokens 8 --temperature 0 --stats
    echo "-- llama worker:"; $pichat ask "Hello from a Pi" --model tiny --max-tokens 8 --temperature 0 --stats
    kill %1 %2 %3; wait
'
cp -n "$cache"/llama_cpp_python-*.whl docker/wheelhouse/linux-arm64/ 2>/dev/null || true

step "the arm64 Docker image (classic builder under emulation, the wheel above reused)"
make build PLATFORM=linux/arm64 ARCH=arm64 IMAGE=pichat:arm64-e2e \
    BASE_IMAGE=local/debian-py:bookworm-arm64 BUILD_IMAGE=local/debian-py-build:bookworm-arm64 >/dev/null
docker image inspect pichat:arm64-e2e --format 'image: {{.Os}}/{{.Architecture}}, {{.Size}} bytes'
chmod -R a+rX "$work"
docker run --rm --platform linux/arm64 -e PICHAT_KEYS=off -v "$work":/work:ro \
    --entrypoint bash pichat:arm64-e2e -euo pipefail -c '
    echo "machine: $(uname -m)"
    pichat router --insecure --http off --log-level warning &
    pichat worker --backend llama --model /work/tiny.gguf --ctx 512 --threads 1 --name image-llama --log-level warning &
    for _ in $(seq 120); do
        timeout 5 pichat status --json 2>/dev/null | grep -q image-llama && break; sleep 1
    done
    pichat ask "Hello from the image" --max-tokens 8 --temperature 0 --stats
    kill %1 %2; wait || true
'
docker rmi pichat:arm64-e2e >/dev/null
rm -rf "$work"
step "arm64-e2e passed"
