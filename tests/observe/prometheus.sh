#!/usr/bin/env bash
# Debian's Prometheus against a running kv: `promtool check metrics` on /metrics, then a real
# Prometheus scrapes kv every second under load from `kv bench`, and the rate of requests it
# computes is queried back from its API.
#
#   bash tests/observe/prometheus.sh
#
# Installs prometheus with apt-get if missing and builds kv in release mode. Bounded: the load
# runs ten seconds; each wait gives up after thirty.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "installing prometheus"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
cargo build --release --quiet
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port); http=$(free_port); prom=$(free_port)
out=target/observe
rm -rf "$out/prometheus-data"; mkdir -p "$out"
target/release/kv serve --port "$port" --http-bind "127.0.0.1:$http" >"$out/kv.log" 2>&1 &
kv=$!
cat >"$out/prometheus.yml" <<YAML
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: kv
    static_configs: [ { targets: ["127.0.0.1:$http"] } ]
YAML
prometheus --config.file="$out/prometheus.yml" --storage.tsdb.path="$out/prometheus-data" \
  --web.listen-address="127.0.0.1:$prom" >"$out/prometheus.log" 2>&1 &
prometheus=$!
trap 'kill $kv $prometheus 2>/dev/null || true' EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$http/health" >/dev/null && break; sleep 0.1; done

curl -sf "http://127.0.0.1:$http/metrics" >"$out/metrics.txt" || fail "no /metrics"
promtool check metrics <"$out/metrics.txt" || fail "promtool check metrics"

target/release/kv bench --port "$port" --duration 10 -c 4 -P 8 --keys 1000 --mix get=0.8,put=0.2 \
  >"$out/bench.txt" 2>&1 &
bench=$!
query='sum(rate(kv_requests_total{command=~"get|put"}[5s]))'
rate=
for _ in $(seq 300); do
  rate=$(curl -sf --get "http://127.0.0.1:$prom/api/v1/query" --data-urlencode "query=$query" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' \
    || echo 0)
  python3 -c "import sys; sys.exit(0 if float('$rate') > 0 else 1)" && break
  sleep 0.1
done
wait "$bench" || fail "kv bench: $(cat "$out/bench.txt")"
python3 -c "import sys; sys.exit(0 if float('$rate') > 0 else 1)" || fail "Prometheus never saw a request rate"
echo "promtool: ok; Prometheus computed $query = $rate requests/s"
