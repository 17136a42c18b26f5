#!/usr/bin/env bash
# Debian packages the test suite needs, installed only when missing (needs root):
# PostgreSQL (the MLflow store of the cluster tests), Chromium (static plot export, and the
# dashboard test's browser) and its driver for Selenium.
set -euo pipefail
missing=()
command -v pg_lsclusters >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "The tests need: ${missing[*]}. Install them (sudo apt-get install ${missing[*]}) and rerun." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
