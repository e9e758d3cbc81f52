#!/usr/bin/env bash
# The systemd path end to end (`make systemd-e2e`; needs root and a Docker engine, which it
# starts if none answers): two Debian containers with systemd as PID 1 on one Docker
# network play two Pis. On pi1 `make install-systemd` (the router's Pi: keys made there),
# pichat-router and pichat-worker started with the shipped units (hardening included);
# `sudo pichat invite` there; on pi2 `make install-systemd PICHAT_JOIN=TOKEN` (joins: a key
# pair of its own, no other secret) and pichat-worker with no router configured. A prompt
# is answered, pi2's worker among those registered; both stop cleanly. (The HA layout:
# scripts/systemd-ha-e2e.sh.)
set -euo pipefail

net=pichat-systemd-e2e
pis=(pi1 pi2)
# shellcheck source=scripts/systemd-pis.sh
source "$(dirname "${BASH_SOURCE[0]}")/systemd-pis.sh"
trap cleanup EXIT
boot_pis

step "pi1: make install-systemd (the router's Pi), start the router and a worker"
install pi1
on pi1 systemctl start pichat-router pichat-worker

step "pi1: sudo pichat invite; pi2: make install-systemd PICHAT_JOIN=TOKEN"
token=$(on pi1 /opt/pichat/venv/bin/pichat invite --keys /etc/pichat/keys --address tcp://pi1:5557)
install pi2 "PICHAT_JOIN=$token"
on pi1 /opt/pichat/venv/bin/pichat keys list --keys /etc/pichat/keys | grep -q 'worker  pi2' ||
    fail "the router did not admit pi2"
router_secret=$(on pi1 sed -n 's/.*secret-key = "\(.*\)"/\1/p' /etc/pichat/keys/router.key_secret)
on pi2 ls -la /etc/pichat/keys
if on pi2 grep -rqF -- "$router_secret" /etc/pichat /var/lib/private/pichat 2>/dev/null; then
    fail "pi2 holds the router's secret key"
fi
[ "$(on pi2 sh -c 'ls /etc/pichat/keys/*.key_secret')" = /etc/pichat/keys/worker.key_secret ] ||
    fail "pi2 holds another secret key than its own"
on pi2 systemctl start pichat-worker

for _ in $(seq 120); do
    case " $(workers pi1) " in *" pi2 "*) [ "$(workers pi1 | wc -w)" -ge 2 ] && break ;; esac
    sleep 1
done
echo "registered workers: $(workers pi1)"
case " $(workers pi1) " in *" pi2 "*) ;; *) fail "pi2's worker did not register" ;; esac
[ "$(workers pi1 | wc -w)" -ge 2 ] || fail "pi1's worker did not register"
on pi1 /opt/pichat/venv/bin/pichat status

step "a prompt"
answer=$(on pi1 /opt/pichat/venv/bin/pichat ask "Hello, how are you?" --max-tokens 60 --temperature 0 --stats)
echo "$answer"
[ -n "$(echo "$answer" | tr -d '[:space:]')" ] || fail "empty answer"

step "running as dynamic users, hardened"
# shellcheck disable=SC2016  # expanded inside the container
on pi1 bash -c 'for u in pichat-router pichat-worker; do
    pid=$(systemctl show -p MainPID --value $u); echo "$u: pid $pid, user $(ps -o user= -p $pid), $(systemctl is-active $u)"; done'
on pi1 systemd-analyze security pichat-router pichat-worker --no-pager | tail -3

step "stop cleanly"
on pi2 systemctl stop pichat-worker
on pi1 systemctl stop pichat-worker pichat-router
for unit in pi1:pichat-router pi1:pichat-worker pi2:pichat-worker; do
    result=$(on "${unit%%:*}" systemctl show -p Result --value "${unit#*:}")
    [ "$result" = success ] || fail "$unit stopped with result $result"
done
echo "all stopped with result success"
step "systemd-e2e passed"
