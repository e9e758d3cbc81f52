#!/usr/bin/env bash
# Build the peers that `make bench` compares pichat with: llama.cpp's own server
# (llama-server, continuous batching) and llama-batched-bench, from the very llama.cpp
# source that the llama-cpp-python sdist vendors, with the same compiler flags as
# scripts/install-llama.sh. Built once per (version, flags, CPU) into a cache.
#
# Usage: scripts/build-peers.sh PYTHON   (PYTHON: an interpreter with pip)
# Prints the directory holding the two binaries on its last line.
# Env:   LLAMA_CPP_VERSION, CMAKE_ARGS (as install-llama.sh), PICHAT_PEER_CACHE
set -euo pipefail

python=${1:?usage: $0 PYTHON}
version=${LLAMA_CPP_VERSION:-0.3.36}
flags=""
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
    flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
cpu=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-12)
key=$(printf '%s|%s|%s|%s|%s' "$version" "${CMAKE_ARGS:-}" "$flags" "$cpu" "$(uname -m)" | sha256sum | cut -c1-16)
out=${PICHAT_PEER_CACHE:-$HOME/.cache/pichat/peers}/llama-$key

if [ -x "$out/llama-server" ] && [ -x "$out/llama-batched-bench" ]; then
    echo "$out"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama-server and llama-batched-bench (llama-cpp-python $version sdist); ~10 min on 2 cores" >&2
# The sdist `make build` downloaded for the images, else pip's.
sdist=$(find "$(dirname "$0")/../docker/wheelhouse" -name "llama_cpp_python-$version.tar.gz" 2>/dev/null | head -1 || true)
if [ -z "$sdist" ]; then
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version" >&2
    sdist=$(ls "$work"/llama_cpp_python-*.tar.gz)
fi
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" ${CMAKE_ARGS:-} >&2
cmake --build "$work/build" -j"$(nproc)" --target llama-server llama-batched-bench >&2
mkdir -p "$out.tmp"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-batched-bench" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
