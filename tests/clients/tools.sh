#!/usr/bin/env bash
# redis-cli and redis-benchmark, with their defaults, against a kv server: `--stat`, `monitor`,
# `-3` (RESP3), `--scan`, `info server`, `dbsize`, `client list`, and `redis-benchmark -t
# ping,set,get` (PING answered, a bucket-less SET or GET refused with a reason).
#
#   bash tests/clients/tools.sh
#
# Installs redis-tools with apt-get if missing and builds kv in release mode, unless KV names
# a kv binary to use instead (CI passes the one `cargo test` has just built). Exits non-zero
# with the failing check.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v redis-cli >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-tools"
  apt-get update -qq && apt-get install -y -qq redis-tools >/dev/null
fi
if [ -z "${KV:-}" ]; then
  cargo build --release --quiet
  KV=target/release/kv
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=target/client-tools
mkdir -p "$out"
"$KV" serve --port "$port" >"$out/kv.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.1; done
fail() { echo "FAILED: $*" >&2; exit 1; }
cli() { redis-cli -p "$port" "$@"; }

[ "$(cli PING)" = PONG ] || fail "PING"
[ "$(cli CREATE shop)" = OK ] || fail "CREATE"
[ "$(cli PUT shop milk 1)" = OK ] || fail "PUT"
[ "$(cli GET shop milk)" = 1 ] || fail "GET"
[ "$(cli DBSIZE)" = 1 ] || fail "DBSIZE"
cli INFO server | grep -q '^redis_version:' || fail "INFO server"
cli CLIENT LIST | grep -q '^id=[0-9]* addr=127.0.0.1:' || fail "CLIENT LIST"
[ "$(redis-cli -p "$port" --scan)" = shop ] || fail "--scan"
[ "$(redis-cli -p "$port" --scan --pattern 'sh*')" = shop ] || fail "--scan --pattern"

# RESP3: redis-cli -3 opens with HELLO 3; a missing key is RESP3's null.
[ "$(redis-cli -3 -p "$port" --no-raw GET shop nothing)" = "(nil)" ] || fail "-3 GET of a missing key"
redis-cli -3 -p "$port" --no-raw HELLO 3 | grep -q 'proto' || fail "-3 HELLO"

# --stat: a number in every column, not -9223372036854775808.
stat=$(timeout 3 stdbuf -oL redis-cli -p "$port" --stat -i 0.5 || true)
echo "$stat" | grep -q -- '-9223372036854775808' && fail "--stat shows unknown values: $stat"
echo "$stat" | grep -qE '^1 +[0-9.]+[KMGB]* +[0-9]+ +0 +[0-9]+' || fail "--stat rows: $stat"

# monitor: another client's requests stream in as Redis shows them.
timeout 3 redis-cli -p "$port" monitor >"$out/monitor.txt" &
monitor=$!
for _ in $(seq 50); do cli CLIENT LIST | grep -q 'flags=O' && break; sleep 0.1; done
cli PUT shop eggs 3 >/dev/null
for _ in $(seq 50); do grep -q '"PUT" "shop" "eggs" "3"' "$out/monitor.txt" && break; sleep 0.1; done
kill "$monitor" 2>/dev/null || true
grep -q '"PUT" "shop" "eggs" "3"' "$out/monitor.txt" || fail "monitor: $(cat "$out/monitor.txt")"

# redis-benchmark: PING in both forms; SET has no bucket and says so.
bench=$(redis-benchmark -p "$port" -t ping -n 2000 -q 2>&1 | tr '\r' '\n')
echo "$bench" | grep -q 'PING_INLINE: [0-9.]* requests per second' || fail "PING_INLINE: $bench"
echo "$bench" | grep -q 'PING_MBULK: [0-9.]* requests per second' || fail "PING_MBULK: $bench"
echo "$bench" | grep -q 'CONFIG' && fail "redis-benchmark could not read CONFIG: $bench"
set_out=$(redis-benchmark -p "$port" -t set -n 100 -q 2>&1 | tr '\r' '\n' || true)
echo "$set_out" | grep -q "kv keeps keys in buckets: 'set' needs one, as in PUT bucket key value" \
  || fail "SET: $set_out"
get_out=$(redis-benchmark -p "$port" -t get -n 100 -q 2>&1 | tr '\r' '\n' || true)
echo "$get_out" | grep -q "kv keeps keys in buckets: 'get' needs one, as in GET bucket key" \
  || fail "GET: $get_out"
echo "redis-cli and redis-benchmark: ok"
