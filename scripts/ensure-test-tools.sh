#!/usr/bin/env bash
# System tools some tests drive, installed when missing and we may (root with apt-get):
#   chromium    the web page test (tests/test_web.py, through Playwright)
#   iptables    the fault lab's packet loss (tests/test_faultlab.py; it also needs root
#               for network namespaces, with iproute2's `ip`)
#   postgresql  the PostgreSQL conversation store's tests (tests/pg.py starts a server of
#               its own in a temporary directory)
#   etcd        the etcd conversation store's tests (tests/etcd.py starts members of its
#               own on loopback) and the fault lab's two-router scenarios
#   keepalived  the fault lab's floating address (tests/faultlab/ha.py; curl checks)
# Otherwise say which tests will be skipped. Never fails the build.
here="$(dirname "${BASH_SOURCE[0]}")"
browser=chromium:chromium
command -v chromium-browser >/dev/null 2>&1 && browser=chromium-browser:chromium
exec "$here/ensure-tools.sh" --optional "$browser" iptables:iptables ip:iproute2 \
    pg_ctlcluster:postgresql etcd:etcd-server \
    keepalived:keepalived curl:curl
