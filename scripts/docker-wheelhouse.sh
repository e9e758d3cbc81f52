#!/usr/bin/env bash
# Collect everything the Docker image installs into docker/wheelhouse/linux-ARCH, so that
# `docker build` needs no network (an offline Pi, or a machine without a registry mirror):
#   - pichat itself, as a wheel built from this checkout, in docker/wheelhouse/pichat (apart:
#     a change to pichat then leaves the image's llama.cpp build layer cached);
#   - its binary dependencies as wheels for the target platform (CPython 3.11, glibc);
#   - llama-cpp-python as source (the image compiles it, portably) and its build backend.
# Usage: scripts/docker-wheelhouse.sh [linux/amd64|linux/arm64] [PYTHON]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
platform=${1:-linux/amd64}
python=${2:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
llama_version=${LLAMA_CPP_VERSION:-0.3.36}
py_version=3.11

case "$platform" in
    linux/amd64) machine=x86_64 ;;
    linux/arm64) machine=aarch64 ;;
    *) echo "unsupported platform $platform (linux/amd64 or linux/arm64)" >&2; exit 2 ;;
esac
out="$here/docker/wheelhouse/${platform//\//-}"
mkdir -p "$out"
pip=("$python" -m pip --disable-pip-version-check)

echo "== pichat wheel"
rm -f "$out"/pichat-*.whl "$here"/docker/wheelhouse/pichat/pichat-*.whl
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$here/docker/wheelhouse/pichat" "$here"

echo "== binary dependencies for $platform, CPython $py_version"
# pichat's requirements (from setup.cfg) and llama-cpp-python's, without llama-cpp-python
# itself (source only on PyPI), plus its build backend and the ninja it asks for, and
# setuptools (to install pichat from source offline, as scripts/systemd-e2e.sh does).
mapfile -t requirements < <("$python" -c '
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in cfg["options"]["install_requires"].split():
    if line and not line.startswith("llama-cpp-python"):
        print(line)' "$here/setup.cfg")
"${pip[@]}" download --quiet --dest "$out" --only-binary=:all: \
    --python-version "$py_version" --implementation cp --abi "cp${py_version/./}" --abi abi3 --abi none \
    --platform "manylinux_2_28_$machine" --platform "manylinux_2_17_$machine" \
    --platform "manylinux2014_$machine" --platform any \
    "${requirements[@]}" \
    "numpy>=1.20" "jinja2>=2.11.3" "diskcache>=5.6.1" "typing-extensions>=4.5.0" \
    "scikit-build-core>=0.9.2" "ninja>=1.5" "setuptools>=68"

echo "== llama-cpp-python $llama_version (source)"
"${pip[@]}" download --quiet --dest "$out" --no-deps --no-binary=:all: \
    "llama-cpp-python==$llama_version"

ls "$out"
