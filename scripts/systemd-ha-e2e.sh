#!/usr/bin/env bash
# The HA layout with systemd end to end (`make systemd-e2e`, after scripts/systemd-e2e.sh;
# root and a Docker engine): three Debian containers with systemd as PID 1 play three Pis.
# pi1 and pi2 are router Pis (pi2 given a copy of pi1's keys), pi3 joins with a token; the
# same `make install-ha` on all three makes etcd members of all, keepalived with the
# floating address on pi1 and pi2, and every worker registered with both routers. Then:
# an OpenAI request through the floating address, a conversation kept; the Pi holding the
# address killed (`docker kill`, a power cut); the address answers on the other router Pi,
# which reports the failover and still has the conversation, continued there; the killed
# Pi boots again and its router takes nothing back. PICHAT_HA_CHECK=floating: keepalived
# checks the election (/health/floating) instead of /health.
set -euo pipefail

net="pichat-ha-e2e"
subnet=172.31.77.0/24
pis=(pi1 pi2 pi3)
ips=(172.31.77.11 172.31.77.12 172.31.77.13)
vip=172.31.77.50
# shellcheck source=scripts/systemd-pis.sh
source "$(dirname "${BASH_SOURCE[0]}")/systemd-pis.sh"
trap cleanup EXIT
boot_pis

pichat=/opt/pichat/venv/bin/pichat
routers="tcp://${ips[0]}:5555,tcp://${ips[1]}:5555"
ha="PICHAT_HA_ETCD='pi1=${ips[0]} pi2=${ips[1]} pi3=${ips[2]}' \
PICHAT_HA_ROUTERS='${ips[0]} ${ips[1]}' PICHAT_HA_ADDRESS=$vip/24 PICHAT_HA_CHECK=${PICHAT_HA_CHECK:-health}"
install_ha() { on "$1" bash -c "cd /tmp/pichat && make install-ha $ha"; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
holders() {  # the Pis holding the floating address, of those given
    local pi
    for pi in "$@"; do
        on "$pi" ip -o addr show 2>/dev/null | grep -q " $vip/" && printf '%s ' "$pi"
    done
    return 0
}
chat() {  # pi (a router Pi: it has a client key), prompt: one turn of the kept conversation
    on "$1" bash -c "echo '$2' | $pichat chat --router $routers --conversation 'ha e2e' \
        --max-tokens 24 --temperature 0"
}
ask_http() {  # from pi3, through the floating address
    on pi3 curl -sf -m 120 "http://$vip:8080/v1/chat/completions" \
        -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        -d '{"model": "default", "messages": [{"role": "user", "content": "Say hello."}],
             "max_tokens": 16, "temperature": 0}'
}

step "pi1 and pi2: make install-systemd (pi2 with a copy of pi1's keys)"
install pi1
on pi1 tar -C /etc/pichat -c keys | docker exec -i pi2 sh -c 'mkdir -p /etc/pichat && tar -C /etc/pichat -x'
install pi2
step "pi1 and pi2: make install-ha (etcd members, keepalived), then both routers"
install_ha pi1
install_ha pi2
for _ in $(seq 60); do on pi1 curl -sf -m 2 http://127.0.0.1:2379/health >/dev/null && break; sleep 1; done
on pi1 curl -sf -m 2 http://127.0.0.1:2379/health || fail "etcd on pi1 and pi2 found no majority"
for pi in pi1 pi2; do on "$pi" systemctl start pichat-router || fail "$pi's router did not start"; done
on pi1 grep -A4 '^# --- high availability' /etc/pichat/pichat.env

step "pi3: joins through pi1 (a token naming both routers), make install-ha (etcd witness)"
token=$(on pi1 "$pichat" invite --keys /etc/pichat/keys --address "tcp://${ips[0]}:5557" \
        --address "tcp://${ips[1]}:5557")
install pi3 "PICHAT_JOIN=$token"
install_ha pi3
on pi3 test ! -e /etc/keepalived/keepalived.conf || fail "pi3 (no router) got keepalived's file"
for pi in "${pis[@]}"; do on "$pi" systemctl start pichat-worker || fail "$pi's worker did not start"; done
for _ in $(seq 180); do
    [ "$(workers pi1 | wc -w)" -ge 3 ] && [ "$(workers pi2 | wc -w)" -ge 3 ] && break
    sleep 1
done
echo "workers with pi1's router: $(workers pi1); with pi2's: $(workers pi2)"
[ "$(workers pi1 | wc -w)" -ge 3 ] && [ "$(workers pi2 | wc -w)" -ge 3 ] ||
    fail "not every worker registered with both routers"
for _ in $(seq 60); do [ -n "$(holders pi1 pi2)" ] && break; sleep 1; done
held=$(holders "${pis[@]}")
[ "$(echo "$held" | wc -w)" = 1 ] || fail "the floating address is held by '$held', not one Pi"
holder=${held% }
other=$([ "$holder" = pi1 ] && echo pi2 || echo pi1)
echo "the floating address $vip is on $holder"
on pi3 curl -sf -m 5 -X POST "http://${ips[2]}:2379/v3/cluster/member/list" -d "{}"; echo

step "an OpenAI request through the floating address; a kept conversation"
key=$(on pi1 sh -c "grep -v '^#' /etc/pichat/keys/api-keys | awk 'NF {print \$1; exit}'")
ask_http | python3 -c 'import json,sys; print("answer:", json.load(sys.stdin)["choices"][0]["message"]["content"])' ||
    fail "no answer through the floating address"
chat "$other" "My name is Ada. Say hi." || fail "no chat turn"
on "$other" "$pichat" status --router "$routers"

step "power cut: docker kill $holder"
t0=$(now)
docker kill "$holder" >/dev/null
for _ in $(seq 300); do [ -n "$(holders "$other")" ] && break; sleep 0.1; done
[ -n "$(holders "$other")" ] || fail "the floating address did not move to $other"
moved=$(since "$t0")
ask_http >/dev/null || fail "no answer through the floating address after the failover"
answered=$(since "$t0")
echo "the address on $other ${moved}s after the kill; a new request answered ${answered}s after"
status=$(on "$other" "$pichat" status)
echo "$status"
grep -q "last failover .* from $holder" <<<"$status" || fail "$other reports no failover from $holder"
on "$other" "$pichat" conversations list | grep -q "ha e2e" || fail "the conversation is lost"
chat "$other" "What is my name?" || fail "the conversation cannot be continued"
turns=$(on "$other" "$pichat" conversations export "ha e2e" --format json |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["messages"]))')
[ "$turns" -ge 4 ] || fail "the conversation holds $turns messages, not both turns"

step "$holder boots again: its router comes back and takes nothing"
docker start "$holder" >/dev/null
for _ in $(seq 60); do
    case "$(on "$holder" systemctl is-system-running 2>/dev/null || true)" in running|degraded) break ;; esac
    sleep 1
done
on "$holder" systemctl start pichat-router || fail "$holder's router did not start again"
for _ in $(seq 120); do [ "$(workers "$holder" | wc -w)" -ge 2 ] && break; sleep 1; done
[ "$(workers "$holder" | wc -w)" -ge 2 ] || fail "the workers did not register with $holder again"
[ "$(holders "${pis[@]}")" = "$other " ] || fail "the address moved back: $(holders "${pis[@]}")"
ask_http >/dev/null || fail "no answer through the floating address after $holder came back"
echo "$holder's router has the workers again ($(workers "$holder")); the address stays on $other"
step "systemd-ha-e2e passed"
