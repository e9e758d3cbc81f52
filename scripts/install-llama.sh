#!/usr/bin/env bash
# Install llama-cpp-python into a virtual environment, compiled so that it works on this
# machine, and build it only once per (version, build flags, CPU) in a wheel cache.
#
# Why not plain `pip install llama-cpp-python`:
# - PyPI ships it as source only, and the compile takes 5-8 minutes on 2 cores;
# - the default `-march=native` build compiles llama.cpp's AMX kernels on CPUs that report
#   AMX, and those crash (SIGSEGV in ggml_backend_amx_mul_mat, llama.cpp issue 20824);
# - pip's own wheel cache ignores CMAKE_ARGS, so a rebuild with other flags silently reuses
#   a wheel built with the old ones. Our cache key includes the flags.
#
# Usage: scripts/install-llama.sh PYTHON   (PYTHON: the venv's interpreter)
# Env:   LLAMA_CPP_VERSION (default below), CMAKE_ARGS (override the flags),
#        PICHAT_WHEEL_CACHE (default ~/.cache/pichat/wheels)
set -euo pipefail

python=${1:?usage: $0 PYTHON}
version=${LLAMA_CPP_VERSION:-0.3.36}

if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ]; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
export CMAKE_ARGS=${CMAKE_ARGS:-}

if "$python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
    echo "llama-cpp-python $version already installed"
    exit 0
fi

# A native build is only valid on a CPU with the same features: key the cache on them.
cpu=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-12)
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
key=$(printf '%s|%s|%s|%s|%s' "$version" "$CMAKE_ARGS" "$cpu" "$pyver" "$(uname -m)" | sha256sum | cut -c1-16)
cache=${PICHAT_WHEEL_CACHE:-$HOME/.cache/pichat/wheels}/llama-$key

if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version (CMAKE_ARGS=$CMAKE_ARGS); this takes several minutes"
    tmp=$(mktemp -d "${cache}.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$cache")"; mktemp -d "${cache}.tmp.XXXXXX"; })
    "$python" -m pip wheel --no-cache-dir --no-deps -w "$tmp" "llama-cpp-python==$version"
    rm -rf "$cache" && mv "$tmp" "$cache"
fi
"$python" -m pip install "$cache"/llama_cpp_python-*.whl
