#!/usr/bin/env bash
# The HA layout on systemd Pis (docs/deploy.md, "Two routers with systemd"): two router
# Pis, etcd on three Pis, one floating address. After `make install-systemd` on every Pi
# (the second router Pi first given a copy of the first one's /etc/pichat/keys), run the
# same command on every Pi of the cluster:
#
#   sudo make install-ha PICHAT_HA_ETCD="pi1=192.168.1.11 pi2=192.168.1.12 pi3=192.168.1.13" \
#        PICHAT_HA_ROUTERS="192.168.1.11 192.168.1.12" PICHAT_HA_ADDRESS=192.168.1.50/24
#
# Each Pi does its part:
#   - an etcd member (its name, PICHAT_HA_NAME or the hostname, in PICHAT_HA_ETCD): Debian's
#     etcd-server as one member of that cluster (/etc/default/etcd, its data in
#     /var/lib/etcd/pichat), reachable only from this Pi, the other members and the routers;
#   - a router Pi (one of its addresses in PICHAT_HA_ROUTERS): Debian's keepalived holding
#     the floating address for a live router (or the one elected in etcd); the router's
#     conversations in
#     etcd (PICHAT_DB) and its --floating-address; pichat-router ordered after etcd;
#   - every Pi: its worker registered with every router (PICHAT_WORKER_ROUTER).
# Run it again with the same values: it changes nothing. Running services are restarted.
#
# Env: PICHAT_HA_ETCD, PICHAT_HA_ROUTERS, PICHAT_HA_ADDRESS (required);
#      PICHAT_HA_NAME (this Pi's member name), PICHAT_HA_INTERFACE (default: the one that
#      reaches the address), PICHAT_HA_VRID (VRRP id, default 77), PICHAT_HA_CHECK
#      (health: the router answers, the default, the fastest failover; floating: only the
#      router elected in etcd, one holder even while the routers cannot hear each other,
#      at the cost of seconds on a failover), PICHAT_HA_NO_APT=1 (etcd-server, keepalived and curl are installed already),
#      PICHAT_ETC (default /etc, for tests).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
etc=${PICHAT_ETC:-/etc}
members=${PICHAT_HA_ETCD:-}
routers=${PICHAT_HA_ROUTERS:-}
address=${PICHAT_HA_ADDRESS:-}
name=${PICHAT_HA_NAME:-$(hostname -s)}
vrid=${PICHAT_HA_VRID:-77}
check=${PICHAT_HA_CHECK:-health}
env_file="$etc/pichat/pichat.env"

fail() { echo "install-ha: $*" >&2; exit 1; }
[ "$etc" != /etc ] || [ "$(id -u)" = 0 ] || fail "run as root (sudo make install-ha ...)"
[ -n "$members" ] && [ -n "$routers" ] && [ -n "$address" ] ||
    fail "needs PICHAT_HA_ETCD=\"NAME=IP ...\", PICHAT_HA_ROUTERS=\"IP IP\" and PICHAT_HA_ADDRESS=IP/PREFIX"
[ -f "$env_file" ] || fail "$env_file is missing: run make install-systemd first"
ip_re='^[0-9A-Fa-f.:]+$'
[[ "$address" =~ ^[0-9A-Fa-f.:]+/[0-9]{1,3}$ ]] || fail "PICHAT_HA_ADDRESS must be IP/PREFIX, not '$address'"
[[ "$vrid" =~ ^[0-9]+$ ]] && [ "$vrid" -ge 1 ] && [ "$vrid" -le 255 ] || fail "PICHAT_HA_VRID must be 1-255"
case "$check" in floating) path=/health/floating rise=1 advert=0.2 ;;
                 health) path=/health rise=2 advert=0.5 ;;
                 *) fail "PICHAT_HA_CHECK must be floating or health" ;; esac
floating=${address%/*}

# The members, NAME=IP each; this Pi's own address if it is one.
cluster="" clients="" allowed="localhost $floating" mine=""
for member in $members; do
    mname=${member%%=*} mip=${member#*=}
    [[ "$mname" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] && [[ "$mip" =~ $ip_re ]] ||
        fail "PICHAT_HA_ETCD: '$member' is not NAME=IP"
    host=$mip; [[ "$mip" == *:* ]] && host="[$mip]"
    cluster+="${cluster:+,}$mname=http://$host:2380"
    clients+="${clients:+,}$host:2379"
    allowed+=" $mip"
    [ "$mname" = "$name" ] && mine=$mip
done
local_ips=" $(hostname -I 2>/dev/null || true) "
router_list="" is_router=""
port=$(sed -n 's|^PICHAT_WORKERS_BIND=.*:\([0-9]\+\)$|\1|p' "$env_file" | tail -1)
for r in $routers; do
    [[ "$r" =~ $ip_re ]] || fail "PICHAT_HA_ROUTERS: '$r' is not an IP address"
    host=$r; [[ "$r" == *:* ]] && host="[$r]"
    router_list+="${router_list:+,}tcp://$host:${port:-5556}"
    allowed+=" $r"
    case "$local_ips" in *" $r "*) is_router=yes ;; esac
done

if [ -z "${PICHAT_HA_NO_APT:-}" ]; then
    want=(curl)
    [ -n "$mine" ] && want+=(etcd-server)
    [ -n "$is_router" ] && want+=(keepalived)
    missing=()
    for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
fi

restart=()
if [ -n "$mine" ]; then
    echo "== etcd member $name ($mine) of $members"
    host=$mine; [[ "$mine" == *:* ]] && host="[$mine]"
    install -d "$etc/default" "$etc/systemd/system/etcd.service.d"
    if [ -f "$etc/default/etcd" ] && ! grep -q '^# pichat' "$etc/default/etcd"; then
        cp -a "$etc/default/etcd" "$etc/default/etcd.before-pichat"
    fi
    # etcd 3.4 starts on arm64 only when told it may.
    unsupported=""; [ "$(uname -m)" = aarch64 ] && unsupported="ETCD_UNSUPPORTED_ARCH=arm64"
    cat > "$etc/default/etcd" <<EOF
# pichat: this Pi's etcd member (scripts/install-ha.sh; the old file, if any, is
# etcd.before-pichat). A member joins the cluster once; to change the members later use
# etcdctl member add/remove (the data directory keeps what it joined).
ETCD_NAME=$name
ETCD_DATA_DIR=/var/lib/etcd/pichat
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=pichat-$(echo "$cluster" | sha256sum | cut -c1-12)
ETCD_LISTEN_PEER_URLS=http://$host:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$host:2380
ETCD_LISTEN_CLIENT_URLS=http://$host:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$host:2379
# A member that comes back does not call an election on rejoining (docs/cluster.md).
ETCD_PRE_VOTE=true
# Every kept turn is a revision: keep one hour's, not all until the 2 GB quota.
ETCD_AUTO_COMPACTION_RETENTION=1
$unsupported
EOF
    # What etcd holds (conversations, admitted keys) is as trusted as the keys directory:
    # only this Pi, the members and the routers reach it.
    cat > "$etc/systemd/system/etcd.service.d/pichat.conf" <<EOF
# pichat (scripts/install-ha.sh): etcd restarts when it fails, and answers only its peers.
[Unit]
After=network-online.target
Wants=network-online.target
[Service]
Restart=on-failure
RestartSec=2
IPAddressDeny=any
IPAddressAllow=$(echo "$allowed" | tr ' ' '\n' | sort -u | tr '\n' ' ')
EOF
    restart+=(etcd)
fi

if [ -n "$is_router" ]; then
    echo "== router Pi: keepalived holds $address for a live router (its $path)"
    interface=${PICHAT_HA_INTERFACE:-$(ip -o route get "$floating" 2>/dev/null |
                                        sed -n 's/.* dev \([^ ]*\).*/\1/p')}
    [ -n "$interface" ] || fail "no interface reaches $floating: set PICHAT_HA_INTERFACE"
    http=$(sed -n 's|^PICHAT_HTTP=.*:\([0-9]\+\)$|\1|p' "$env_file" | tail -1)
    install -d "$etc/keepalived" "$etc/systemd/system/pichat-router.service.d"
    sed -e "s|@PORT@|${http:-8080}|" -e "s|@CHECK@|$path|" -e "s|@RISE@|$rise|" \
        -e "s|@ADVERT@|$advert|" -e "s|@INTERFACE@|$interface|" -e "s|@VRID@|$vrid|" \
        -e "s|@ADDRESS@|$address|" "$here/systemd/keepalived.conf" > "$etc/keepalived/keepalived.conf"
    cat > "$etc/systemd/system/pichat-router.service.d/ha.conf" <<EOF
# pichat (scripts/install-ha.sh): the router keeps its conversations in etcd.
[Unit]
After=etcd.service
Wants=etcd.service
EOF
    restart+=(keepalived)
fi

echo "== $env_file: the high-availability block"
block="# --- high availability (make install-ha; run it again to change) ---
PICHAT_WORKER_ROUTER=$router_list"
if [ -n "$is_router" ]; then
    block+="
PICHAT_DB=etcd://$clients
PICHAT_FLOATING_ADDRESS=$floating"
fi
block+="
# --- end of high availability ---"
tmp=$(mktemp "$env_file.XXXXXX")
sed '/^# --- high availability/,/^# --- end of high availability ---$/d' "$env_file" > "$tmp"
printf '%s\n' "$block" >> "$tmp"
chmod --reference="$env_file" "$tmp"
mv "$tmp" "$env_file"

if [ "$etc" = /etc ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    for unit in "${restart[@]}"; do
        systemctl enable --quiet "$unit"
        # An etcd member of a new cluster is ready only once a majority has started.
        systemctl restart --no-block "$unit"
    done
    systemctl try-restart --no-block pichat-router pichat-worker
fi
cat <<MSG

done: $( [ -n "$mine" ] && echo "etcd member $name; " )$( [ -n "$is_router" ] && echo "router Pi holding $floating (check $path); " )worker registered with $router_list
  etcd:     curl -s http://127.0.0.1:2379/health   (once a majority of members runs)
  status:   /opt/pichat/venv/bin/pichat status --router ${router_list//5556/5555}
MSG
