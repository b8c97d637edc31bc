#!/usr/bin/env bash
# The status page in headless Chromium (tests/observe/page.py): a bucket created a moment
# before shows, and a bucket's crash and restart; writes docs/status-page.png.
#
#   bash tests/observe/page.sh
#
# Installs chromium and chromium-driver with apt-get and Selenium with pip (in a virtual
# environment under target/) if missing, and builds kv in release mode.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "installing chromium and chromium-driver"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python=python3
if ! $python -c 'import selenium' 2>/dev/null; then
  python=target/selenium/bin/python
  if ! $python -c 'import selenium' 2>/dev/null; then
    python3 -m venv target/selenium
    target/selenium/bin/pip install --quiet selenium
  fi
fi
cargo build --release --quiet
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port); http=$(free_port)
out=target/observe
rm -rf "$out/page-data"; mkdir -p "$out"
target/release/kv serve --port "$port" --http-bind "127.0.0.1:$http" --data-dir "$out/page-data" \
  --enable-debug-commands >"$out/page-kv.log" 2>&1 &
kv=$!
trap 'kill $kv 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$http/health" >/dev/null && break; sleep 0.1; done
timeout 120 $python tests/observe/page.py target/release/kv "$port" "http://127.0.0.1:$http/" docs/status-page.png
