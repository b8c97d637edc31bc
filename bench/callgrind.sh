#!/usr/bin/env bash
# What one request costs the server with one bucket and with 10,000, counted rather than timed:
# instructions, data reads and writes, and misses of a simulated cache, per request, from
# valgrind's callgrind. The counts barely move from run to run (well under 1%), where the
# throughput ratio of bench/compare.sh moves by several percent, so this shows small changes on
# the many-buckets path that a timed run cannot.
#
#   bash bench/callgrind.sh                      # RESP, 1 and 10,000 buckets (about a minute)
#   PROTOCOL=line FUNCTIONS=1 bash bench/callgrind.sh   # line protocol, and where they differ
#
# The server runs under callgrind with one worker and busy polling off (so that every counted
# instruction is work) and is loaded by `kv bench` (`-c 50 -P 16 --mix get=0.9,put=0.1`, 100,000
# keys preloaded). Counters are zeroed before and dumped after each of two runs, of SHORT and
# LONG requests; the per-request figures are their difference over LONG - SHORT requests, so
# the set-up of each run (a CREATE for every bucket) cancels out. The simulated caches are this
# machine's first level (32 KiB, 8-way) and a 1 MiB second level ("LL" in valgrind's terms); a
# second-level miss is then roughly a trip to L3. Valgrind runs the server about 50 times slower
# and serialises its threads, so batching differs from a real run: compare the two bucket counts
# with each other, not with timed figures. Installs valgrind with apt-get if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PROTOCOL=${PROTOCOL:-resp}
SHORT=${SHORT:-50000}
LONG=${LONG:-150000}
PORT=${PORT:-4052}
FUNCTIONS=${FUNCTIONS:-}
OUT=${OUT:-target/callgrind}
mkdir -p "$OUT"

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  echo "installing valgrind"
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
cargo build --release --quiet
KV=target/release/kv

server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

profile() { # buckets
  local buckets=$1 prefix="$OUT/$PROTOCOL-$1"
  rm -f "$prefix".*
  if (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "port $PORT is already serving: stop that server or set PORT" >&2; exit 1
  fi
  valgrind --tool=callgrind --cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,8,64 \
    --callgrind-out-file="$prefix.%p" "$KV" serve --port "$PORT" --threads 1 --busy-poll-us 0 \
    >/dev/null 2>"$prefix.log" &
  server=$!
  for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  "$KV" bench --port "$PORT" --buckets "$buckets" --preload --keys 100000 -c 1 -n 1 >/dev/null
  for requests in "$SHORT" "$LONG"; do
    callgrind_control --zero "$server" >/dev/null 2>&1
    "$KV" bench --port "$PORT" --protocol "$PROTOCOL" --buckets "$buckets" --keys 100000 \
      -c 50 -P 16 -n "$requests" --mix get=0.9,put=0.1 2>/dev/null | tail -1 >"$prefix.json"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(r['errors'] != 0)" \
      "$prefix.json" || { echo "kv bench reported errors: $prefix.json" >&2; exit 1; }
    callgrind_control --dump "$server" >/dev/null 2>&1
  done
  kill "$server"; wait "$server" 2>/dev/null || true; server=
  # Dumps are numbered in order: .1 after the short run, .2 after the long one.
  mv "$(ls "$prefix".*.1)" "$prefix.short"; mv "$(ls "$prefix".*.2)" "$prefix.long"
}

profile 1
profile 10000

python3 - "$OUT/$PROTOCOL" $((LONG - SHORT)) "$FUNCTIONS" <<'PY'
import collections, re, sys

prefix, requests, functions = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def read(path):
    """Totals per event, and exclusive instructions per function, of one callgrind dump."""
    names, per_function, function, call_line = {}, collections.Counter(), None, False
    for line in open(path):
        if line.startswith('events:'):
            events = line.split()[1:]
        elif line.startswith(('summary:', 'totals:')):
            totals = [int(count) for count in line.split()[1:]]
        elif line.startswith(('fn=', 'cfn=')):
            found = re.match(r'c?fn=\((\d+)\)(?: (.*))?', line.strip())
            if found.group(2):
                names[found.group(1)] = found.group(2)
            if line.startswith('fn='):
                function = names[found.group(1)]
        elif line.startswith('calls='):
            call_line = True  # the next cost line is the call's inclusive cost
        elif function and line[:1] in '0123456789+-*' and line.strip():
            if call_line:
                call_line = False
            elif len(line.split()) > 1:
                per_function[function] += int(line.split()[1])
    return dict(zip(events, totals)), per_function

def per_request(buckets):
    short_totals, short_functions = read(f'{prefix}-{buckets}.short')
    long_totals, long_functions = read(f'{prefix}-{buckets}.long')
    long_functions.subtract(short_functions)
    return ({event: (long_totals[event] - short_totals[event]) / requests for event in long_totals},
            {name: count / requests for name, count in long_functions.items()})

one, one_functions = per_request(1)
many, many_functions = per_request(10000)
labels = {'Ir': 'instructions', 'Dr': 'data reads', 'Dw': 'data writes',
          'D1mr': 'L1 read misses', 'D1mw': 'L1 write misses',
          'DLmr': 'L2 (1 MiB) read misses', 'DLmw': 'L2 (1 MiB) write misses'}
print(f'per request, {requests} requests, {prefix.rsplit("/", 1)[-1]}')
print(f'| {"":<26} | {"1 bucket":>9} | {"10,000":>9} | {"10,000/1":>8} |')
print(f'|{"-" * 28}|{"-" * 11}|{"-" * 11}|{"-" * 10}|')
for event, label in labels.items():
    print(f'| {label:<26} | {one[event]:9.2f} | {many[event]:9.2f} | {many[event] / one[event]:8.3f} |')
if functions:
    print('\ninstructions per request by function, where the two differ by 2 or more:')
    for name in sorted(set(one_functions) | set(many_functions),
                       key=lambda name: one_functions.get(name, 0) - many_functions.get(name, 0)):
        before, after = one_functions.get(name, 0), many_functions.get(name, 0)
        if abs(after - before) >= 2:
            print(f'{before:8.1f} {after:8.1f} {after - before:+8.1f}  {name[:110]}')
PY
