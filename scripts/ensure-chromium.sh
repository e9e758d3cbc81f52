#!/usr/bin/env bash
# The browser test (tests/test_web.py) drives Debian's chromium with Playwright. Install
# chromium when it is missing and we may (root with apt-get); otherwise say why the test
# will be skipped. Never fails the build.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test (once)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/tmp/pichat-chromium.log 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/tmp/pichat-chromium.log 2>&1; }; then
        exit 0
    fi
    echo "could not install chromium (see /tmp/pichat-chromium.log): the browser test will be skipped"
else
    echo "chromium is not installed (apt-get install chromium): the browser test will be skipped"
fi
exit 0
