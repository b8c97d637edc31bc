#!/usr/bin/env bash
# redis-cli and redis-benchmark, with their defaults, against a kv server: `--stat`, `monitor`,
# `-3` (RESP3), `--scan`, `info server`, `dbsize`, `client list`, `help`, the interactive
# prompt, `--pipe`, and `redis-benchmark -t ping,set,get` (PING answered, a bucket-less SET or
# GET refused with a reason); then against a three-node cluster: `redis-cli -c` and
# `redis-benchmark --cluster` on buckets of every slot.
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
out=target/client-tools
mkdir -p "$out"
"$KV" serve --port "$port" >"$out/kv.log" 2>&1 &
server=$!
nodes=()
trap 'kill $server "${nodes[@]}" 2>/dev/null || true' EXIT
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

# help: redis-cli builds it from COMMAND DOCS, and stops on an assertion if the reply is not
# shaped as Redis's (as the interactive prompt does on start).
cli help put | grep -q 'bucket key value' || fail "help put: $(cli help put)"
cli help @bucket | grep -q 'SCAN' || fail "help @bucket: $(cli help @bucket)"
# The interactive prompt, in a terminal (TERM=dumb: no cursor queries to answer).
prompt=$(TERM=dumb timeout 20 python3 - "$port" <<'PYTHON'
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execvp("redis-cli", ["redis-cli", "-p", sys.argv[1]])
seen = b""
def read_until(text):
    global seen
    while text not in seen:
        ready, _, _ = select.select([fd], [], [], 10)
        if not ready:
            sys.exit(f"no {text!r} in {seen!r}")
        seen += os.read(fd, 4096)
for line in [b"help get", b"PUT shop bread 2", b"GET shop bread"]:
    read_until(b"> ")
    seen = b""
    os.write(fd, line + b"\r")
read_until(b'"2"')
os.write(fd, b"quit\r")
_, status = os.waitpid(pid, 0)
print("exited", os.waitstatus_to_exitcode(status))
PYTHON
) || fail "interactive redis-cli: $prompt"
[ "$prompt" = "exited 0" ] || fail "interactive redis-cli: $prompt"
# --pipe: RESP in, every reply read (it ends with an empty line and an ECHO).
piped=$(printf '*2\r\n$6\r\nCREATE\r\n$4\r\npipe\r\n*4\r\n$3\r\nPUT\r\n$4\r\npipe\r\n$1\r\na\r\n$1\r\n1\r\n' \
  | cli --pipe 2>&1) || fail "--pipe: $piped"
echo "$piped" | grep -q 'errors: 0, replies: 2' || fail "--pipe: $piped"
[ "$(cli ECHO hello)" = hello ] || fail "ECHO"

# A three-node cluster.
ports=() binds=()
for id in 1 2 3; do
  ports+=("$(free_port)")
  binds+=("127.0.0.1:$(free_port)")
done
peers="1=${binds[0]},2=${binds[1]},3=${binds[2]}"
rm -rf "$out/cluster"
for id in 1 2 3; do
  "$KV" serve --port "${ports[id-1]}" --node-id "$id" --cluster-bind "${binds[id-1]}" \
    --peers "$peers" --data-dir "$out/cluster/$id" --heartbeat-ms 50 --election-timeout-ms 300 \
    >"$out/node$id.log" 2>&1 &
  nodes+=($!)
done
for node_port in "${ports[@]}"; do
  for _ in $(seq 300); do
    redis-cli -p "$node_port" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok' && break
    sleep 0.1
  done
  redis-cli -p "$node_port" CLUSTER INFO | grep -q 'cluster_state:ok' \
    || fail "cluster on $node_port: $(tail "$out"/node*.log)"
done
node() { redis-cli -c -p "${ports[$1]}" "${@:2}"; }
# -c follows redirections if any: every node answers for every bucket.
[ "$(node 0 CREATE cart)" = OK ] || fail "cluster CREATE"
[ "$(node 1 PUT cart milk 1)" = OK ] || fail "cluster PUT"
[ "$(node 2 GET cart milk)" = 1 ] || fail "cluster GET"
# redis-benchmark --cluster puts each slot's hash tag in place of {tag}: one bucket a slot.
python3 -c '
import sys; sys.path.insert(0, "bench")
from cluster import slot_tags
for tag in slot_tags():
    name = "b" + tag
    sys.stdout.write(f"*2\r\n$6\r\nCREATE\r\n${len(name)}\r\n{name}\r\n")
' >"$out/create.resp"
created=$(node 0 --pipe <"$out/create.resp" 2>&1) || fail "cluster --pipe: $created"
echo "$created" | grep -q 'errors: 0, replies: 16384' || fail "cluster --pipe: $created"
# One redis-benchmark --cluster run: its CSV line (command, rate), and no error.
cluster_bench() {
  local csv
  csv=$(timeout 120 redis-benchmark --cluster -p "${ports[0]}" -n 20000 -c 6 -P 4 -r 1000 --csv \
    "$@" 2>&1) || fail "redis-benchmark --cluster $*: $csv"
  echo "$csv" | grep -qi 'error' && fail "redis-benchmark --cluster $*: $csv"
  echo "$csv" | grep -E "^\"$1 b\{tag\}[^\"]*\",\"[0-9.]+\"" | cut -d, -f1-2 \
    || fail "redis-benchmark --cluster $*: $csv"
}
put_rate=$(cluster_bench PUT 'b{tag}' key:__rand_int__ v)
get_rate=$(cluster_bench GET 'b{tag}' key:__rand_int__)
echo "redis-cli and redis-benchmark: ok (cluster: $put_rate $get_rate)"
