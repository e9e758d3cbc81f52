#!/usr/bin/env bash
# Install pichat as systemd services on this machine (a Raspberry Pi or any Linux box):
#   a virtual environment in /opt/pichat/venv with llama-cpp-python built for this CPU and
#   pichat; the default model, assembled (pinned, verified) into the worker's state
#   directory; the units in /etc/systemd/system; the configuration in
#   /etc/pichat/pichat.env (kept if it exists); and keys in /etc/pichat/keys:
#   - the router's Pi (no token): its CurveZMQ keys are made there (kept if they exist),
#     shared with the services' group; `sudo pichat invite` then makes join tokens;
#   - every other Pi (PICHAT_JOIN=TOKEN from `pichat invite`): `pichat join` makes this
#     Pi's own key pair and the router admits it; the Pi keeps only that pair, the
#     router's public key and the router's address. No other host's secret is copied.
# Then: `systemctl enable --now pichat-router` on the router's Pi, `systemctl enable --now
# pichat-worker` on every Pi that answers.
#
# Usage: sudo make install-systemd                            (the router's Pi)
#        sudo make install-systemd PICHAT_JOIN=pichat1.eyJ...  (a worker Pi)
# Env:   PICHAT_JOIN (a join token), PICHAT_JOIN_NAME (default: the hostname),
#        PREFIX (default /opt/pichat), DESTDIR (stage into another root, for packaging),
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
join=${PICHAT_JOIN:-}
if [ -n "$join" ] && [ -z "$root" ]; then
    echo "== joining the cluster"
    "$venv/bin/pichat" join "$join" --keys "$keys" --name "${PICHAT_JOIN_NAME:-$(hostname -s)}"
elif [ ! -f "$keys/router.key" ]; then
    "$venv/bin/pichat" keygen --keys "$keys"
fi
if [ -z "$root" ]; then
    # The services run as dynamic users in group pichat; the router also in
    # pichat-secrets, the only group that reads its secret and api-keys.
    "$here/scripts/key-permissions.sh" "$keys"
fi
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

if [ -f "$keys/router.key_secret" ]; then
    next="on this Pi (the router's):  systemctl enable --now pichat-router
  then for each other Pi:  sudo $prefix/venv/bin/pichat invite --keys /etc/pichat/keys
  and on that Pi:          sudo make install-systemd PICHAT_JOIN=<the token>"
else
    next="this Pi has joined; the router's address is in /etc/pichat/keys/router.json"
fi
cat <<MSG

pichat is installed. Next:
  $next
  on every Pi that answers:  systemctl enable --now pichat-worker
  (settings: /etc/pichat/pichat.env)
  logs: journalctl -u pichat-worker -f     status: $prefix/venv/bin/pichat status
MSG
