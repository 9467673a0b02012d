#!/usr/bin/env bash
# The Debian packages the test suite uses, installed when missing (as root, or with sudo):
#   postgresql  tests/test_tune_postgres.py starts its own server on a free port with a temporary data folder (the
#               package's default cluster is kept from starting and never used)
#   chromium    tests/test_report_browser.py opens the smoke report in it, headless
# Without root or sudo it says what is missing and goes on: those tests then skip (and fail under CI=true).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; else
    missing=""
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
    command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
    [ -z "$missing" ] || echo "setup: not root and no sudo: install$missing with apt to run every test" >&2
    exit 0
  fi
fi
apt_install() {
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  norc=""  # a policy-rc.d that denies service starts keeps the package's own cluster from starting
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null && $SUDO chmod +x /usr/sbin/policy-rc.d
    norc=1
  fi
  apt_install postgresql
  [ -z "$norc" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
command -v chromium >/dev/null 2>&1 || apt_install chromium
