#!/usr/bin/env bash
# make clients-e2e: the real clients (Open WebUI in headless Chromium, LangChain, ollama,
# openai) against `make run`'s cluster. Each gets a virtual environment of its own under
# $E2E_DIR (made once, kept); output (screenshots, summary.json) in $E2E_DIR/out/<time>.
#   scripts/clients-e2e.sh PYTHON PICHAT
set -euo pipefail
PYTHON=${1:-python3}
PICHAT=${2:-.venv/bin/pichat}
E2E_DIR=${E2E_DIR:-.e2e}
OWUI_VERSION=${OWUI_VERSION:-0.12.4}
OUT="$E2E_DIR/out/$(date +%Y%m%d-%H%M%S)"

venv() {  # venv DIR STAMP PACKAGES...: make DIR with PACKAGES unless STAMP says it has them
    local dir=$1 stamp=$2; shift 2
    if [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$dir"
        "$PYTHON" -m venv "$dir"
        "$dir/bin/pip" install --quiet --upgrade pip
        "$dir/bin/pip" install --quiet "$@"
        echo "$stamp" > "$dir/.stamp"
    fi
}

if ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q chromium > /dev/null
    else
        echo "clients-e2e needs Debian's chromium: sudo apt-get install chromium" >&2
        exit 2
    fi
fi

echo "clients-e2e: virtual environments in $E2E_DIR (first run: several minutes)"
venv "$E2E_DIR/clients" "clients-1" openai ollama langchain-core langchain-openai \
    langchain-ollama
# torch first: the CPU build (a find-links of this machine's pip has it; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), or pip fetches CUDA's.
if [ "$(cat "$E2E_DIR/owui/.stamp" 2>/dev/null)" != "open-webui-$OWUI_VERSION" ]; then
    rm -rf "$E2E_DIR/owui"
    "$PYTHON" -m venv "$E2E_DIR/owui"
    "$E2E_DIR/owui/bin/pip" install --quiet --upgrade pip
    "$E2E_DIR/owui/bin/pip" install --quiet torch==2.13.0
    "$E2E_DIR/owui/bin/pip" install --quiet "open-webui==$OWUI_VERSION" playwright
    echo "open-webui-$OWUI_VERSION" > "$E2E_DIR/owui/.stamp"
fi

mkdir -p "$OUT"
exec "$E2E_DIR/owui/bin/python" tests/clients/e2e.py --pichat "$PICHAT" \
    --clients-python "$E2E_DIR/clients/bin/python" --out "$OUT"
