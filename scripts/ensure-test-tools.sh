#!/usr/bin/env bash
# System tools some tests drive, installed when missing and we may (root with apt-get):
#   chromium    the web page test (tests/test_web.py, through Playwright)
#   iptables    the fault lab's packet loss (tests/test_faultlab.py; it also needs root
#               for network namespaces, with iproute2's `ip`)
# Otherwise say which tests will be skipped. Never fails the build.
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} for the tests (once)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q "${missing[@]}" >/tmp/pichat-test-tools.log 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 &&
         apt-get install -y -q "${missing[@]}" >/tmp/pichat-test-tools.log 2>&1; }; then
        exit 0
    fi
    echo "could not install ${missing[*]} (see /tmp/pichat-test-tools.log): their tests will be skipped"
else
    echo "${missing[*]} not installed (apt-get install ${missing[*]}): their tests will be skipped"
fi
exit 0
