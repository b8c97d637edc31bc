#!/usr/bin/env bash
# What one request costs the server with one bucket and with 10,000, counted rather than timed:
# instructions, data reads and writes, and misses of a simulated cache, per request, from
# valgrind's callgrind. The counts barely move from run to run (well under 1%), where the
# throughput ratio of bench/compare.sh moves by several percent, so this shows small changes on
# the many-buckets path that a timed run cannot.
#
#   bash bench/callgrind.sh                      # RESP, 1 and 10,000 buckets (about a minute)
#   PROTOCOL=line FUNCTIONS=1 bash bench/callgrind.sh   # line protocol, and where they differ
#   ANNOTATE=ReadNames::resolve bash bench/callgrind.sh  # per instruction, in that function
#
# ANNOTATE=<part of a function's name> also records each instruction's count
# (--dump-instr=yes) and prints the disassembly of the first function whose name contains it,
# each instruction with its count per request for one bucket and for 10,000: where a function's
# instructions go, loop by loop (installs binutils for objdump if missing).
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
ANNOTATE=${ANNOTATE:-}
OUT=${OUT:-target/callgrind}
mkdir -p "$OUT"

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
  echo "installing valgrind"
  apt-get update -qq && apt-get install -y -qq valgrind >/dev/null
fi
if [ -n "$ANNOTATE" ] && ! command -v objdump >/dev/null; then
  echo "installing binutils"
  apt-get update -qq && apt-get install -y -qq binutils >/dev/null
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
    --dump-instr="$([ -n "$ANNOTATE" ] && echo yes || echo no)" \
    --callgrind-out-file="$prefix.%p" "$KV" serve --port "$PORT" --threads 1 --busy-poll-us 0 \
    >/dev/null 2>"$prefix.log" &
  server=$!
  for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  "$KV" bench --port "$PORT" --buckets "$buckets" --preload --keep --keys 100000 -c 1 -n 1 >/dev/null
  for requests in "$SHORT" "$LONG"; do
    callgrind_control --zero "$server" >/dev/null 2>&1
    "$KV" bench --port "$PORT" --protocol "$PROTOCOL" --buckets "$buckets" --keys 100000 \
      -c 50 -P 16 -n "$requests" --mix get=0.9,put=0.1 --keep --json 2>/dev/null | tail -1 >"$prefix.json"
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

python3 - "$OUT/$PROTOCOL" $((LONG - SHORT)) "$FUNCTIONS" "$ANNOTATE" "$KV" <<'PY'
import collections, re, subprocess, sys

prefix, requests, functions, annotate, binary = sys.argv[1:6]
requests = int(requests)

def number(text):
    """A position or cost field: decimal or 0x-hex, with a sign when relative to the last."""
    body = text.lstrip('+-')
    value = int(body, 16) if body.startswith('0x') else int(body)
    return -value if text.startswith('-') else value

def read(path):
    """Totals per event, exclusive instructions per function, and per instruction address
    (with ANNOTATE) of one callgrind dump."""
    names, per_function, per_address = {}, collections.Counter(), collections.Counter()
    function, call_line, columns, position = None, False, 1, [0]
    for line in open(path):
        if line.startswith('positions:'):
            columns = len(line.split()) - 1  # "instr line" with --dump-instr=yes, else "line"
            position = [0] * columns
        elif line.startswith('events:'):
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
            fields = line.split()
            for column, field in enumerate(fields[:columns]):
                if field[0] in '+-':
                    position[column] += number(field)
                elif field != '*':
                    position[column] = number(field)
            if call_line:
                call_line = False
            elif len(fields) > columns:
                per_function[function] += number(fields[columns])
                if annotate and annotate in function:
                    per_address[(function, position[0])] += number(fields[columns])
    return dict(zip(events, totals)), per_function, per_address

def per_request(buckets):
    short_totals, short_functions, short_addresses = read(f'{prefix}-{buckets}.short')
    long_totals, long_functions, long_addresses = read(f'{prefix}-{buckets}.long')
    long_functions.subtract(short_functions)
    long_addresses.subtract(short_addresses)
    return ({event: (long_totals[event] - short_totals[event]) / requests for event in long_totals},
            {name: count / requests for name, count in long_functions.items()},
            {key: count / requests for key, count in long_addresses.items() if count})

one, one_functions, one_addresses = per_request(1)
many, many_functions, many_addresses = per_request(10000)
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
if annotate:
    # The instantiation of the matching functions that runs the most instructions.
    counted = collections.Counter()
    for (name, _), count in list(one_addresses.items()) + list(many_addresses.items()):
        counted[name] += count
    if not counted:
        sys.exit(f'no function whose name contains {annotate!r} ran')
    name = counted.most_common(1)[0][0]
    addresses = sorted(address for (function, address) in set(one_addresses) | set(many_addresses)
                       if function == name)
    listing = subprocess.run(
        ['objdump', '-d', '-l', '-C', '--no-show-raw-insn', f'--start-address={addresses[0]}',
         f'--stop-address={addresses[-1] + 16}', binary],
        capture_output=True, text=True, check=True).stdout
    print(f'\ninstructions per request in {name[:100]}')
    print(f'{"1 bucket":>9} {"10,000":>9}  instruction (and the source line it came from)')
    for line in listing.splitlines():
        found = re.match(r'\s*([0-9a-f]+):\s*(.*)', line)
        if found:
            address = int(found.group(1), 16)
            counts = [table.get((name, address), 0) for table in (one_addresses, many_addresses)]
            shown = [f'{count:9.2f}' if abs(count) >= 0.005 else ' ' * 9 for count in counts]
            print(f'{shown[0]} {shown[1]}  {found.group(1)}: {found.group(2)}')
        elif line.startswith('/'):
            print(f'{"":20}# {line.rsplit("/", 1)[-1]}')
PY
