#!/usr/bin/env bash
# Installs redis-server (the Debian package) when it is not on PATH: the fleet tests (fleet/tests/) and the
# fleet benchmark start their own redis-server on 127.0.0.1. Needs root (or sudo) and the Debian archive; does
# nothing when redis-server is already installed. Usage: bash scripts/setup-redis.sh
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
echo "installing redis-server (the Debian package; the fleet tests need it)" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: redis-server is missing and this is not root (no sudo either): apt-get install redis-server" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package starts a system redis on port 6379 where there is an init system; the tests use their own.
command -v redis-server >/dev/null 2>&1 || { echo "error: redis-server is still not on PATH after apt-get install" >&2; exit 1; }
redis-server --version >&2
