#!/usr/bin/env bash
# Who may read what in a pichat keys directory, for the systemd services (run as root by
# install-systemd.sh; again after `pichat keygen` or adding api-keys by hand):
#   group pichat (every service): the public keys, router.json, this Pi's worker pair;
#   group pichat-secrets (the router only): the router's secret key, api-keys, the client
#     secret, and the folders the router writes (the Pis it admits, invitations, revoked
#     keys; setgid, so what is written there stays the router's group's).
# A worker's service is in group pichat only: no worker holds the router's secret.
# Usage: key-permissions.sh KEYS_DIR   (env PICHAT_GROUP, PICHAT_ROUTER_GROUP to rename)
set -euo pipefail
keys=$1
group=${PICHAT_GROUP:-pichat}
router_group=${PICHAT_ROUTER_GROUP:-pichat-secrets}
# Before 2026-12-07 that group was called pichat-router: a static group of the router's own
# unit name, which stops systemd from making the unit's dynamic user (217/USER). Its files
# are given to the new group below.
if [ -z "${PICHAT_ROUTER_GROUP:-}" ] && getent group pichat-router >/dev/null; then
    groupdel pichat-router
fi
for g in "$group" "$router_group"; do
    getent group "$g" >/dev/null || groupadd --system "$g"
done
chgrp -R "$group" "$keys"
chmod -R g+rX,g-w,o-rwx "$keys"
if [ -f "$keys/router.key_secret" ]; then
    for f in router.key_secret client.key_secret api-keys; do
        if [ -e "$keys/$f" ]; then
            chgrp "$router_group" "$keys/$f"
            chmod 0640 "$keys/$f"
        fi
    done
    for d in workers clients invites revoked; do
        install -d -g "$router_group" -m 2770 "$keys/$d"
        chgrp -R "$router_group" "$keys/$d"
        chmod 2770 "$keys/$d"
        find "$keys/$d" -mindepth 1 -type d -exec chmod 2770 {} +
        find "$keys/$d" -type f -exec chmod g+rw,o-rwx {} +
    done
fi
