#!/usr/bin/env bash
# Make sure the system tools a target drives are installed: COMMAND:PACKAGE pairs.
#   scripts/ensure-tools.sh dockerd:docker.io debootstrap:debootstrap
# Missing ones are installed in one go where we may (root with apt-get). Otherwise one
# message names every missing package, and the exit status is 1, or 0 with --optional
# (then the tests that need them are skipped).
set -uo pipefail
optional=""
if [ "${1:-}" = "--optional" ]; then optional=yes; shift; fi
missing=()
for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (once)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q "${missing[@]}" >/tmp/pichat-tools.log 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 &&
         apt-get install -y -q "${missing[@]}" >/tmp/pichat-tools.log 2>&1; }; then
        exit 0
    fi
    echo "could not install ${missing[*]} (see /tmp/pichat-tools.log)" >&2
else
    echo "missing: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
fi
[ -n "$optional" ] && { echo "(the tests that need them will be skipped)"; exit 0; }
exit 1
