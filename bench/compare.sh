#!/usr/bin/env bash
# kv against Redis on this machine, side by side, interleaved A B A B over several rounds.
#
#   bash bench/compare.sh              # full run (about twelve minutes on 2 cores)
#   ROUNDS=1 REQUESTS=200000 bash bench/compare.sh   # a quick look
#
# Installs redis-server and redis-tools with apt-get if missing, builds kv in release mode,
# starts both on loopback (Redis with persistence off), and runs:
#   - redis-benchmark against both, same client and workload: 50 clients, 100,000-key keyspace,
#     32-byte values, pipeline depth 16 and 1 (DEPTH1_REPEATS runs per round at depth 1, where
#     single runs move most). Redis: SET/GET and HSET/HGET shopping;
#     kv: PUT/GET shopping through RESP. Server CPU per request from /proc.
#   - kv bench against kv: RESP and line protocol, 1 bucket and 10,000 buckets, in pairs
#     (KV_BENCH_PAIRS per round, the order alternating).
#   - memory: one million 16-byte keys with 32-byte values loaded into each; RSS per key.
#   - durability: Redis with appendonly yes against kv with --data-dir, at the same fsync
#     policy (everysec, always), same redis-benchmark workloads; and kv's start-up time
#     with one million keys in its log.
# Prints a table of medians and kv/Redis ratios (the median of the ratios of runs paired within
# a round, with a 95% interval), writes docs/benchmarks.md and
# docs/benchmarks.svg.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
REQUESTS=${REQUESTS:-1000000}
DEPTH1_REQUESTS=${DEPTH1_REQUESTS:-200000}
# Depth 1 is bound by the load generator and moves most from run to run: more pairs there.
DEPTH1_REPEATS=${DEPTH1_REPEATS:-3}
KV_BENCH_PAIRS=${KV_BENCH_PAIRS:-8}
MEMORY_KEYS=${MEMORY_KEYS:-1000000}
KV_PORT=${KV_PORT:-4041}
REDIS_PORT=${REDIS_PORT:-6390}
# kv serves with its defaults (the headline rows); KV_THREADS=N sets its workers instead. A
# second kv beside it serves with SECOND_KV_FLAGS (one worker by default: what earlier reports
# measured) for a second set of rows; SECOND_KV_FLAGS= (empty) leaves it out.
KV_THREADS=${KV_THREADS-}
SECOND_KV_FLAGS=${SECOND_KV_FLAGS---threads 1}
SECOND_KV_PORT=${SECOND_KV_PORT:-4042}
OUT=${OUT:-target/compare}
mkdir -p "$OUT"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-server and redis-tools"
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet
KV=target/release/kv

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

ensure_free() { # port
  if redis-cli -p "$1" PING >/dev/null 2>&1; then
    echo "port $1 is already serving: stop that server or set KV_PORT / REDIS_PORT" >&2; exit 1
  fi
}
wait_for() { # port
  for _ in $(seq 100); do redis-cli -p "$1" PING >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "server on port $1 did not start" >&2; exit 1
}
start_redis() { # [extra redis-server arguments]
  ensure_free "$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --save "" --appendonly no --daemonize no --logfile "" "$@" \
    >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!; pids+=("$REDIS_PID"); wait_for "$REDIS_PORT"
}
start_kv() { # [extra kv serve arguments]
  ensure_free "$KV_PORT"
  local threads=()
  [ -n "$KV_THREADS" ] && threads=(--threads "$KV_THREADS")
  RUST_LOG=info "$KV" serve --port "$KV_PORT" "${threads[@]}" "$@" >"$OUT/kv.log" 2>&1 &
  KV_PID=$!; pids+=("$KV_PID"); wait_for "$KV_PORT"
}
start_second_kv() {
  ensure_free "$SECOND_KV_PORT"
  # shellcheck disable=SC2086 # the flags are words
  RUST_LOG=info "$KV" serve --port "$SECOND_KV_PORT" --http-bind off $SECOND_KV_FLAGS \
    >"$OUT/kv-second.log" 2>&1 &
  SECOND_KV_PID=$!; pids+=("$SECOND_KV_PID"); wait_for "$SECOND_KV_PORT"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_bytes() { awk '/VmRSS/ {print $2*1024}' "/proc/$1/status"; }

VALUE=$(printf 'v%.0s' $(seq 32))
RESULTS="$OUT/results.csv"
echo "round,server,workload,depth,ops_per_second,p50_ms,p99_ms,cpu_us_per_request" >"$RESULTS"

# One redis-benchmark run: records throughput, latency and the server's CPU per request.
run() { # round server pid port workload depth requests command...
  local round=$1 server=$2 pid=$3 port=$4 workload=$5 depth=$6 requests=$7; shift 7
  local before after line
  before=$(cpu_ticks "$pid")
  line=$(redis-benchmark -p "$port" -c 50 -r 100000 -n "$requests" -P "$depth" -q --csv "$@" \
    2>/dev/null | tail -1)
  after=$(cpu_ticks "$pid")
  # "test","rps","avg","min","p50","p95","p99","max"
  python3 - "$round" "$server" "$workload" "$depth" "$requests" "$before" "$after" "$line" \
    >>"$RESULTS" <<'PY'
import sys
round_, server, workload, depth, requests, before, after, line = sys.argv[1:]
fields = [f.strip('"') for f in line.split('","')]
import os
ticks = os.sysconf("SC_CLK_TCK")
cpu = (int(after) - int(before)) / ticks / int(requests) * 1e6
print(f"{round_},{server},{workload},{depth},{float(fields[1]):.0f},{fields[4]},{fields[6]},{cpu:.3f}")
PY
  tail -1 "$RESULTS"
}

kv_bench() { # round protocol buckets
  local round=$1 protocol=$2 buckets=$3 json
  json=$("$KV" bench --port "$KV_PORT" --protocol "$protocol" --buckets "$buckets" --preload \
    --keys 100000 -c 50 -P 16 -n "$REQUESTS" --mix get=0.9,put=0.1 --json 2>/dev/null | tail -1)
  python3 - "$round" "$protocol" "$buckets" "$json" >>"$RESULTS" <<'PY'
import json, sys
round_, protocol, buckets, line = sys.argv[1:]
report = json.loads(line)
assert report["errors"] == 0, report
print(f"{round_},kv,kvbench-{protocol}-{buckets}b,16,{report['ops_per_second']:.0f},"
      f"{report['p50_us']/1000:.3f},{report['p99_us']/1000:.3f},")
PY
  tail -1 "$RESULTS"
}

echo "== throughput: $ROUNDS rounds, interleaved"
start_redis
start_kv
redis-cli -p "$KV_PORT" CREATE shopping >/dev/null
servers=(redis kv)
if [ -n "$SECOND_KV_FLAGS" ]; then
  start_second_kv
  redis-cli -p "$SECOND_KV_PORT" CREATE shopping >/dev/null
  servers+=(kv-second)
fi
KV_WORKERS=$(grep -o 'workers: .*' "$OUT/kv.log" | head -1)
echo "kv's defaults here: $KV_WORKERS"
for round in $(seq "$ROUNDS"); do
  for depth in 16 1; do
    requests=$REQUESTS; repeats=1
    [ "$depth" = 1 ] && requests=$DEPTH1_REQUESTS && repeats=$DEPTH1_REPEATS
    for repeat in $(seq "$repeats"); do
      # Each run is labelled with its round (and repeat): the report pairs kv's and Redis's runs
      # of the same label. Writes before reads, so that reads find their keys; the servers'
      # order turns from one label to the next.
      label=$round; [ "$repeats" -gt 1 ] && label=$round.$repeat
      turn=$(((round + repeat) % ${#servers[@]}))
      order=("${servers[@]:$turn}" "${servers[@]:0:$turn}")
      for phase in write read; do
        for server in "${order[@]}"; do
          case $server in
            redis)
              if [ "$phase" = write ]; then
                run "$label" redis "$REDIS_PID" "$REDIS_PORT" SET "$depth" "$requests" SET 'key:__rand_int__' "$VALUE"
                run "$label" redis "$REDIS_PID" "$REDIS_PORT" HSET "$depth" "$requests" HSET shopping 'key:__rand_int__' "$VALUE"
              else
                run "$label" redis "$REDIS_PID" "$REDIS_PORT" GET "$depth" "$requests" GET 'key:__rand_int__'
                run "$label" redis "$REDIS_PID" "$REDIS_PORT" HGET "$depth" "$requests" HGET shopping 'key:__rand_int__'
              fi ;;
            kv|kv-second)
              pid=$KV_PID; port=$KV_PORT
              [ "$server" = kv-second ] && pid=$SECOND_KV_PID && port=$SECOND_KV_PORT
              if [ "$phase" = write ]; then
                run "$label" "$server" "$pid" "$port" PUT "$depth" "$requests" PUT shopping 'key:__rand_int__' "$VALUE"
              else
                run "$label" "$server" "$pid" "$port" GET "$depth" "$requests" GET shopping 'key:__rand_int__'
              fi ;;
          esac
        done
      done
    done
  done
  # Pairs of runs, 1 bucket and 10,000, the order alternating: the report takes the median
  # of each pair's ratio, which cancels the drift of a shared machine between pairs.
  for pair in $(seq "$KV_BENCH_PAIRS"); do
    for protocol in resp line; do
      if (( (round + pair) % 2 == 0 )); then order=(1 10000); else order=(10000 1); fi
      for buckets in "${order[@]}"; do
        kv_bench "$round.$pair" "$protocol" "$buckets"
      done
    done
  done
done
stop "$KV_PID"; stop "$REDIS_PID"
[ -n "$SECOND_KV_FLAGS" ] && stop "$SECOND_KV_PID"

echo "== memory: $MEMORY_KEYS keys of 16 bytes with 32-byte values"
MEMORY="$OUT/memory.csv"
echo "server,keys,rss_start,rss_loaded,used_memory" >"$MEMORY"
# Both allocate with jemalloc, which gives the pages a growing table leaves behind back to the
# system over a second or so (kv: dirty_decay_ms 1000, .cargo/config.toml; Redis: its own
# defaults): RSS is read once that has had time.
settle_allocator() { sleep "${SETTLE_SECONDS:-3}"; }
load_redis() { # command-per-key generator: set | hset
  python3 - "$MEMORY_KEYS" "$1" <<'PY' | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
import sys
keys, kind = int(sys.argv[1]), sys.argv[2]
out = sys.stdout.buffer
def bulk(b): return b"$%d\r\n%s\r\n" % (len(b), b)
for i in range(keys):
    key = b"key:%012d" % i
    digits = str(i).encode()
    value = (digits * (32 // len(digits) + 1))[:32]
    if kind == "set":
        out.write(b"*3\r\n" + bulk(b"SET") + bulk(key) + bulk(value))
    else:
        out.write(b"*4\r\n" + bulk(b"HSET") + bulk(b"shopping") + bulk(key) + bulk(value))
PY
}
for kind in set hset; do
  start_redis
  start=$(rss_bytes "$REDIS_PID")
  load_redis "$kind"
  settle_allocator
  used=$(redis-cli -p "$REDIS_PORT" INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  echo "redis-$kind,$MEMORY_KEYS,$start,$(rss_bytes "$REDIS_PID"),$used" >>"$MEMORY"
  tail -1 "$MEMORY"
  stop "$REDIS_PID"
done
start_kv
start=$(rss_bytes "$KV_PID")
"$KV" bench --port "$KV_PORT" --preload --keys "$MEMORY_KEYS" --buckets 1 -n 1 -c 1 --keep >/dev/null 2>&1
settle_allocator
used=$(redis-cli -p "$KV_PORT" INFO | awk -F: '/^memory_used_bytes:/ {print $2}' | tr -d '\r')
echo "kv,$MEMORY_KEYS,$start,$(rss_bytes "$KV_PID"),$used" >>"$MEMORY"
tail -1 "$MEMORY"
stop "$KV_PID"

echo "== durability: Redis appendonly against kv --data-dir, $ROUNDS rounds"
# On the project's disk, not a tmpfs: an fsync must reach the device.
DURABLE_DIR="$OUT/durable"
for fsync in everysec always; do
  rm -rf "$DURABLE_DIR"; mkdir -p "$DURABLE_DIR/redis"
  start_redis --appendonly yes --appendfsync "$fsync" --dir "$DURABLE_DIR/redis"
  start_kv --data-dir "$DURABLE_DIR/kv" --fsync "$fsync"
  redis-cli -p "$KV_PORT" CREATE shopping >/dev/null
  for round in $(seq "$ROUNDS"); do
    for depth in 16 1; do
      requests=$REQUESTS; [ "$depth" = 1 ] && requests=$DEPTH1_REQUESTS
      pairs=("redis" "kv"); [ $((round % 2)) = 0 ] && pairs=("kv" "redis")
      for server in "${pairs[@]}"; do
        if [ "$server" = redis ]; then
          run "$round" "redis-aof-$fsync" "$REDIS_PID" "$REDIS_PORT" SET "$depth" "$requests" SET 'key:__rand_int__' "$VALUE"
          run "$round" "redis-aof-$fsync" "$REDIS_PID" "$REDIS_PORT" HSET "$depth" "$requests" HSET shopping 'key:__rand_int__' "$VALUE"
        else
          run "$round" "kv-$fsync" "$KV_PID" "$KV_PORT" PUT "$depth" "$requests" PUT shopping 'key:__rand_int__' "$VALUE"
        fi
      done
    done
  done
  stop "$KV_PID"; stop "$REDIS_PID"
done

echo "== start-up: kv recovering $MEMORY_KEYS keys from its log"
rm -rf "$DURABLE_DIR"
start_kv --data-dir "$DURABLE_DIR/kv"
"$KV" bench --port "$KV_PORT" --preload --keys "$MEMORY_KEYS" --buckets 1 -n 1 -c 1 --keep >/dev/null 2>&1
stop "$KV_PID"
start_kv --data-dir "$DURABLE_DIR/kv"
STARTUP="$OUT/startup.txt"
grep -o 'records=[0-9]* .*elapsed_ms=[0-9]*' "$OUT/kv.log" | tail -1 >"$STARTUP"
cat "$STARTUP"
stop "$KV_PID"
rm -rf "$DURABLE_DIR"

python3 bench/report.py "$RESULTS" "$MEMORY" "$(redis-server --version | awk '{print $3}' | cut -d= -f2)" \
  "bench/compare.sh (ROUNDS=$ROUNDS REQUESTS=$REQUESTS DEPTH1_REQUESTS=$DEPTH1_REQUESTS DEPTH1_REPEATS=$DEPTH1_REPEATS KV_BENCH_PAIRS=$KV_BENCH_PAIRS KV_THREADS=${KV_THREADS:-default})" \
  "$KV_WORKERS" "$SECOND_KV_FLAGS"
