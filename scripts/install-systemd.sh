#!/usr/bin/env bash
# Install pichat as systemd services on this machine (a Raspberry Pi or any Linux box):
#   a virtual environment in /opt/pichat/venv with llama-cpp-python built for this CPU and
#   pichat; the default model, assembled (pinned, verified) into the worker's state
#   directory; the units in /etc/systemd/system; the configuration in
#   /etc/pichat/pichat.env and CurveZMQ keys in /etc/pichat/keys (both kept if they exist).
# Then: edit /etc/pichat/pichat.env and `systemctl enable --now pichat-worker` (and
# pichat-router on the Pi that runs the router).
#
# Usage: sudo scripts/install-systemd.sh        (or: sudo make install-systemd)
# Env:   PREFIX (default /opt/pichat), DESTDIR (stage into another root, for packaging),
#        PICHAT_FETCH_MODEL (default yes; "no" to skip assembling the default model).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix=${PREFIX:-/opt/pichat}
root=${DESTDIR:-}
fetch_model=${PICHAT_FETCH_MODEL:-yes}
python=${PYTHON:-python3}

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install-systemd: run as root (sudo make install-systemd)" >&2
    exit 1
fi

venv="$root$prefix/venv"
echo "== virtual environment in $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$here/scripts/install-llama.sh" "$venv/bin/python"
"$venv/bin/python" -m pip install --quiet "$here"
if [ "$fetch_model" != no ]; then
    # The worker's StateDirectory (DynamicUser: systemd hands it to the service's user).
    models="$root/var/lib/private/pichat/models"
    echo "== the default model into $models"
    install -d -m 0700 "$root/var/lib/private"
    install -d "$models"
    PICHAT_MODEL_DIR="$models" "$venv/bin/pichat" models default
fi

echo "== units and configuration"
install -d "$root/etc/systemd/system" "$root/etc/pichat"
install -m 0644 "$here/systemd/pichat-router.service" "$here/systemd/pichat-worker.service" \
    "$root/etc/systemd/system/"
if [ -e "$root/etc/pichat/pichat.env" ]; then
    echo "keeping the existing $root/etc/pichat/pichat.env"
else
    install -m 0644 "$here/systemd/pichat.env" "$root/etc/pichat/pichat.env"
fi
keys="$root/etc/pichat/keys"
if [ ! -f "$keys/router.key" ]; then
    "$venv/bin/pichat" keygen --keys "$keys"
fi
if [ -z "$root" ]; then
    # The services run as dynamic users in group pichat: let that group read the keys.
    getent group pichat >/dev/null || groupadd --system pichat
    chgrp -R pichat "$keys"
    chmod -R g+rX,g-w,o-rwx "$keys"
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<MSG

pichat is installed. Next:
  1. edit /etc/pichat/pichat.env (at least PICHAT_WORKER_ROUTER on the workers), and give
     every Pi the same /etc/pichat/keys (copy it from the router's Pi, group pichat)
  2. on the router's Pi:  systemctl enable --now pichat-router
  3. on every worker Pi:  systemctl enable --now pichat-worker
  logs: journalctl -u pichat-worker -f     health: $prefix/venv/bin/pichat health
MSG
