#!/usr/bin/env bash
# Headless Chromium for the report screenshot test (tests/test_report.py). Debian/Ubuntu only.
# Not part of install.sh on purpose: it needs root and ~300 MB; CI runs it before the tests.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed: $(chromium --version 2>/dev/null || true)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core
chromium --version
