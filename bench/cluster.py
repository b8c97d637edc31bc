#!/usr/bin/env python3
"""A 3-node kv cluster against Redis Cluster (3 masters, one replica each, persistence off) on
this machine, with the same client and workload, interleaved in one run; and a kv single node
beside them. Run through bench/cluster.sh, which installs Redis and builds kv first.

Measures, per round and depth (16 and 1): redis-benchmark --cluster throughput, p50 and p99,
and the servers' CPU per request (every process of the cluster, replicas included); the idle
CPU of both clusters; and, after the load, the time from kill -9 of a node to the first
acknowledged write on each shard it led. Writes the cluster section of docs/benchmarks.md and
docs/benchmarks-cluster.svg. Standard library only."""

import csv
import datetime
import io
import itertools
import os
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import threading
import time

ROUNDS = int(os.environ.get("ROUNDS", "3"))
# redis-benchmark --cluster notices the end of a run on a 250 ms tick: runs last five seconds
# or more, so that the tick moves a result by a few per cent at most. Requests per run, by
# workload and depth (GET is faster than PUT; SCALE shrinks or grows them all).
SCALE = float(os.environ.get("SCALE", "1"))
REQUESTS = {
    ("put", 16): int(2_000_000 * SCALE),
    ("get", 16): int(5_000_000 * SCALE),
    ("put", 1): int(300_000 * SCALE),
    ("get", 1): int(500_000 * SCALE),
}
# ONLY=moves runs only the measurement of a node joining a loaded cluster.
ONLY = os.environ.get("ONLY", "")
# Extra `kv serve` flags for the cluster's nodes, e.g. KV_FLAGS="--threads 1".
KV_FLAGS = os.environ.get("KV_FLAGS", "").split()
CLIENTS = 50
KEYSPACE = 100000
VALUE = "v" * 32
OUT = os.path.abspath(os.environ.get("OUT", "target/cluster-bench"))
KV = os.path.abspath("target/release/kv")
KV_PORTS = [4141, 4142, 4143]
KV_PEER_PORTS = [7501, 7502, 7503]
KV_SINGLE_PORT = 4150
REDIS_PORTS = [6401, 6402, 6403, 6404, 6405, 6406]
# Redis Cluster's failure detection: as long as kv's election timeout (1 s), so that the
# failover times compare like with like (Redis's default is 15 s).
REDIS_NODE_TIMEOUT_MS = 1000
TICKS = os.sysconf("SC_CLK_TCK")
SLOTS = 16384


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_tags():
    """For every slot, the hash tag redis-benchmark --cluster puts in place of `{tag}` for a
    client on the node holding it: Redis's table of the shortest alphanumeric string of each
    slot (the first in 0-9A-Za-z order), padded with `}` to three characters."""
    alphabet = string.digits + string.ascii_uppercase + string.ascii_lowercase
    table = [None] * SLOTS
    for length in (1, 2, 3):
        for chars in itertools.product(alphabet, repeat=length):
            tag = "".join(chars)
            slot = crc16(tag.encode()) % SLOTS
            if table[slot] is None:
                table[slot] = tag
    return ["{" + tag + "}" * (3 - len(tag)) + "}" for tag in table]


def command(*words):
    out = f"*{len(words)}\r\n".encode()
    for word in words:
        word = word if isinstance(word, bytes) else str(word).encode()
        out += b"$%d\r\n%s\r\n" % (len(word), word)
    return out


def call(port, *words, timeout=2.0):
    """One request; the reply's first line (bulk replies: their body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command(*words))
        return read_reply(sock.makefile("rb"))


def read_reply(reader):
    line = reader.readline()
    if not line:
        raise ConnectionError("closed")
    if line[:1] == b"$":
        length = int(line[1:])
        return None if length < 0 else reader.read(length + 2)[:-2].decode()
    return line.decode().rstrip("\r\n")


def pipeline(port, requests):
    """Sends `requests` (RESP commands) at once and returns their one-line replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"".join(requests))
        reader = sock.makefile("rb")
        return [read_reply(reader) for _ in requests]


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def wait_until(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Servers:
    def __init__(self):
        self.processes = {}

    def start(self, name, argv, log):
        handle = open(os.path.join(OUT, log), "w")
        self.processes[name] = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)
        return self.processes[name]

    def pids(self, prefix):
        return [p.pid for name, p in self.processes.items() if name.startswith(prefix) and p.poll() is None]

    def kill(self, name, sig=signal.SIGKILL):
        process = self.processes.pop(name)
        process.send_signal(sig)
        process.wait()

    def stop_all(self):
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


def start_kv_cluster(servers):
    peers = ",".join(f"{i + 1}=127.0.0.1:{port}" for i, port in enumerate(KV_PEER_PORTS))
    for i, port in enumerate(KV_PORTS):
        start_kv_node(servers, i, peers)
    wait_until(lambda: all("cluster_state:ok" in call(port, "CLUSTER", "INFO") for port in KV_PORTS),
               "the kv cluster")
    # Leadership spreads over the nodes within seconds of forming.
    wait_until(lambda: all(led_slots(call(port, "CLUSTER", "NODES")) for port in KV_PORTS[:1]),
               "leadership to spread")


def start_kv_node(servers, i, peers):
    directory = os.path.join(OUT, f"kv{i + 1}")
    os.makedirs(directory, exist_ok=True)
    servers.start(f"kv{i + 1}", [KV, "serve", "--port", str(KV_PORTS[i]), "--node-id", str(i + 1),
                                 "--cluster-bind", f"127.0.0.1:{KV_PEER_PORTS[i]}", "--peers", peers,
                                 "--data-dir", directory, *KV_FLAGS], f"kv{i + 1}.log")


def led_slots(nodes_text):
    """Whether every master line of CLUSTER NODES shows slots."""
    lines = [line for line in nodes_text.splitlines() if "master" in line]
    return len(lines) == 3 and all(len(line.split()) > 8 for line in lines)


def start_redis_cluster(servers):
    for port in REDIS_PORTS:
        directory = os.path.join(OUT, f"redis{port}")
        os.makedirs(directory, exist_ok=True)
        servers.start(f"redis{port}", ["redis-server", "--port", str(port), "--cluster-enabled", "yes",
                                       "--cluster-config-file", "nodes.conf",
                                       "--cluster-node-timeout", str(REDIS_NODE_TIMEOUT_MS),
                                       "--dir", directory, "--save", "", "--appendonly", "no"],
                      f"redis{port}.log")
    wait_until(lambda: all(call(port, "PING") == "+PONG" for port in REDIS_PORTS), "redis servers")
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in REDIS_PORTS],
                    "--cluster-replicas", "1", "--cluster-yes"], check=True,
                   stdout=subprocess.DEVNULL)
    wait_until(lambda: all("cluster_state:ok" in call(port, "CLUSTER", "INFO") for port in REDIS_PORTS),
               "Redis Cluster")


def benchmark(port, depth, requests, words, cluster):
    argv = ["redis-benchmark", "-p", str(port), "-c", str(CLIENTS), "-r", str(KEYSPACE),
            "-n", str(requests), "-P", str(depth), "--csv"]
    if cluster:
        argv.append("--cluster")
    output = subprocess.run(argv + words, capture_output=True, text=True, timeout=600).stdout
    rows = list(csv.reader(io.StringIO(output.strip().splitlines()[-1])))
    fields = rows[0]
    return float(fields[1]), float(fields[4]), float(fields[6])


def idle_cpu(pids, seconds=10):
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds * 100


def failover_writer(port_of_slot, slot_tag, stop, result):
    """Writes to a bucket (or key) of one slot in a loop, through whichever node takes it,
    and records when each acknowledged write was sent and acknowledged."""
    sequence = 0
    while not stop.is_set():
        sequence += 1
        sent = time.monotonic()
        try:
            reply = port_of_slot(slot_tag, sequence)
        except (OSError, ConnectionError, ValueError):
            time.sleep(0.02)
            continue
        if reply == "+OK":
            result.append((sent, time.monotonic()))
        else:
            time.sleep(0.02)


def kv_failover(servers, tags):
    """Kills the node leading the first shard; for each shard it led, the time from the kill to
    the first write acknowledged through another node."""
    nodes = call(KV_PORTS[0], "CLUSTER", "NODES")
    victim_line = next(line for line in nodes.splitlines() if "myself" not in line and len(line.split()) > 8)
    victim_port = int(victim_line.split()[1].split(":")[1].split("@")[0])
    victim = KV_PORTS.index(victim_port)
    survivor = KV_PORTS[(victim + 1) % 3]
    led = [tuple(map(int, part.split("-"))) for part in victim_line.split()[8:]]
    writers = []
    stop = threading.Event()
    for first, _ in led:
        bucket = "b" + tags[first]
        call(survivor, "CREATE", bucket)

        def put(_tag, sequence, bucket=bucket):
            return call(survivor, "PUT", bucket, f"failover:{sequence}", "v", timeout=10)

        acknowledged = []
        thread = threading.Thread(target=failover_writer, args=(put, bucket, stop, acknowledged))
        thread.start()
        writers.append((f"{first}-", acknowledged, thread))
    time.sleep(1)
    killed_at = time.monotonic()
    servers.kill(f"kv{victim + 1}")
    time.sleep(8)
    stop.set()
    times = []
    for _, acknowledged, thread in writers:
        thread.join()
        after = [acked for sent, acked in acknowledged if sent > killed_at]
        times.append(after[0] - killed_at if after else None)
    return times


def redis_failover(servers):
    """Kills a master; the time from the kill to the first write acknowledged by the replica
    that takes over its slots (the writer follows CLUSTER SLOTS, as a cluster client does)."""
    slots = parse_slots(REDIS_PORTS[0])
    first, port = slots[0]
    victim = f"redis{port}"
    key = f"failover{{{slot_tags_for_redis[first]}}}"
    stop = threading.Event()
    acknowledged = []

    def put(_tag, sequence):
        for candidate in REDIS_PORTS:
            if candidate == port:
                continue
            try:
                owner = dict(parse_slots(candidate)).get(first)
                break
            except (OSError, ConnectionError, ValueError):
                continue
        else:
            raise ConnectionError("no node answers")
        return call(owner, "SET", key, sequence, timeout=2)

    thread = threading.Thread(target=failover_writer, args=(put, key, stop, acknowledged))
    thread.start()
    time.sleep(1)
    killed_at = time.monotonic()
    servers.kill(victim)
    time.sleep(10)
    stop.set()
    thread.join()
    after = [acked for sent, acked in acknowledged if sent > killed_at]
    return after[0] - killed_at if after else None


def parse_slots(port):
    """(first slot, master port) of each range CLUSTER SLOTS lists."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command("CLUSTER", "SLOTS"))
        reader = sock.makefile("rb")

        def value():
            line = reader.readline()
            kind, rest = line[:1], line[1:].strip()
            if kind == b"*":
                return [value() for _ in range(int(rest))]
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return reader.read(int(rest) + 2)[:-2].decode()
            if kind == b"-":
                raise ValueError(rest.decode())
            return rest.decode()

        return [(entry[0], entry[2][1]) for entry in value()]


slot_tags_for_redis = None


def main():
    global slot_tags_for_redis
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    tags = slot_tags()
    slot_tags_for_redis = [tag.strip("{}") for tag in tags]
    if ONLY in ("", "moves"):
        move_report(*move_phase(tags))
    if ONLY == "moves":
        return
    servers = Servers()
    try:
        start_kv_cluster(servers)
        start_redis_cluster(servers)
        directory = os.path.join(OUT, "kv-single")
        os.makedirs(directory)
        servers.start("single", [KV, "serve", "--port", str(KV_SINGLE_PORT), "--data-dir", directory],
                      "kv-single.log")
        wait_until(lambda: call(KV_SINGLE_PORT, "PING") == "+PONG", "the kv single node")
        # redis-benchmark --cluster gives each client a bucket `b{TAG}` of a slot its node
        # leads: create one for every slot (and `b{tag}` for the single node, where the tag
        # stays as written).
        created = pipeline(KV_PORTS[0], [command("CREATE", "b" + tag) for tag in tags])
        assert all(reply == "+OK" for reply in created), set(created)
        assert call(KV_SINGLE_PORT, "CREATE", "b{tag}") == "+OK"

        idle = {"kv cluster": idle_cpu(servers.pids("kv")),
                "Redis Cluster": idle_cpu(servers.pids("redis"))}
        print(f"idle CPU, % of one core: {idle}", flush=True)

        systems = {
            "kv cluster": (KV_PORTS[0], True, "kv", {"put": ["PUT", "b{tag}", "key:__rand_int__", VALUE],
                                                   "get": ["GET", "b{tag}", "key:__rand_int__"]}),
            "Redis Cluster": (REDIS_PORTS[0], True, "redis", {"put": ["SET", "b{tag}:key:__rand_int__", VALUE],
                                                              "get": ["GET", "b{tag}:key:__rand_int__"]}),
            "kv single node": (KV_SINGLE_PORT, False, "single", {"put": ["PUT", "b{tag}", "key:__rand_int__", VALUE],
                                                                 "get": ["GET", "b{tag}", "key:__rand_int__"]}),
        }
        rows = []
        for round_ in range(1, ROUNDS + 1):
            order = list(systems) if round_ % 2 else list(reversed(systems))
            for depth in (16, 1):
                for workload in ("put", "get"):
                    requests = REQUESTS[(workload, depth)]
                    for system in order:
                        port, cluster, prefix, workloads = systems[system]
                        pids = servers.pids(prefix)
                        before = cpu_seconds(pids)
                        ops, p50, p99 = benchmark(port, depth, requests, workloads[workload], cluster)
                        cpu = (cpu_seconds(pids) - before) / requests * 1e6
                        row = dict(round=round_, system=system, workload=workload, depth=depth,
                                   ops=ops, p50=p50, p99=p99, cpu=cpu)
                        rows.append(row)
                        print(row, flush=True)
        kv_times = kv_failover(servers, tags)
        print(f"kv failover (s): {kv_times}", flush=True)
        redis_time = redis_failover(servers)
        print(f"Redis Cluster failover (s): {redis_time}", flush=True)
    finally:
        servers.stop_all()
    report(rows, idle, kv_times, redis_time)


def ratio_line(rows, workload, depth, other):
    pairs = []
    for round_ in range(1, ROUNDS + 1):
        mine = [r["ops"] for r in rows if r["round"] == round_ and r["system"] == "kv cluster"
                and r["workload"] == workload and r["depth"] == depth]
        theirs = [r["ops"] for r in rows if r["round"] == round_ and r["system"] == other
                  and r["workload"] == workload and r["depth"] == depth]
        if mine and theirs:
            pairs.append(mine[0] / theirs[0])
    return statistics.median(pairs), min(pairs), max(pairs)


def report(rows, idle, kv_times, redis_time):
    def median(system, workload, depth, field):
        return statistics.median(r[field] for r in rows if r["system"] == system
                                 and r["workload"] == workload and r["depth"] == depth)

    table = ["| workload | depth | kv cluster ops/s | Redis Cluster ops/s | kv single ops/s | "
             "kv cluster ÷ Redis Cluster (median, min–max) | kv cluster ÷ kv single | "
             "p50 / p99 ms, kv cluster | p50 / p99 ms, Redis Cluster | CPU µs/request, kv cluster | "
             "CPU µs/request, Redis Cluster |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    bars = []
    for depth in (16, 1):
        for workload in ("put", "get"):
            mid, low, high = ratio_line(rows, workload, depth, "Redis Cluster")
            single, _, _ = ratio_line(rows, workload, depth, "kv single node")
            name = {"put": "PUT / SET", "get": "GET"}[workload]
            bars.append((f"{name}, depth {depth}", mid))
            table.append(
                f"| {name} | {depth} | {median('kv cluster', workload, depth, 'ops'):,.0f} | "
                f"{median('Redis Cluster', workload, depth, 'ops'):,.0f} | "
                f"{median('kv single node', workload, depth, 'ops'):,.0f} | "
                f"**{mid:.2f}** ({low:.2f}–{high:.2f}) | {single:.2f} | "
                f"{median('kv cluster', workload, depth, 'p50'):.2f} / {median('kv cluster', workload, depth, 'p99'):.2f} | "
                f"{median('Redis Cluster', workload, depth, 'p50'):.2f} / {median('Redis Cluster', workload, depth, 'p99'):.2f} | "
                f"{median('kv cluster', workload, depth, 'cpu'):.2f} | {median('Redis Cluster', workload, depth, 'cpu'):.2f} |")
    failover = ", ".join("none within 8 s" if t is None else f"{t:.2f} s" for t in kv_times)
    redis_failover_text = "none within 10 s" if redis_time is None else f"{redis_time:.2f} s"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    section = f"""{BEGIN}
## kv cluster against Redis Cluster

Measured {datetime.date.today()} by `bash bench/cluster.sh` (ROUNDS={ROUNDS}, SCALE={SCALE}: requests
per run {", ".join(f"{w.upper()} depth {d}: {n:,}" for (w, d), n in REQUESTS.items())}) at kv commit
`{commit}`, Redis {version.removeprefix("v=")}; every server and the
load generator on this machine's {os.cpu_count()} cores. kv: three nodes with default flags (three
shards, three replicas each, its default fsync policy, logs on disk). Redis Cluster: three masters
with one replica each, persistence off, `cluster-node-timeout {REDIS_NODE_TIMEOUT_MS}`. The same
client and workload for both: `redis-benchmark --cluster -c {CLIENTS} -r {KEYSPACE}` with 32-byte
values; each client writes to a slot of the node it talks to (`{{tag}}`), kv with
`PUT b{{tag}} key:__rand_int__`, Redis with `SET b{{tag}}:key:__rand_int__`. The kv single node
runs the same commands without `--cluster`, with `--data-dir`. Runs are interleaved, the order
alternating by round; a ratio is the median over rounds of runs made seconds apart. CPU is the
user+system time of every process of the cluster (replicas included) per request.

![kv cluster ÷ Redis Cluster](benchmarks-cluster.svg)

{chr(10).join(table)}

Idle, the kv cluster's three processes used {idle['kv cluster']:.2f}% of one core together over
10 s (Redis Cluster's six: {idle['Redis Cluster']:.2f}%).

Failover: kill -9 of a kv node; the time to the first write acknowledged through another node
on each shard it led: {failover}. Redis Cluster, kill -9 of a master, the time to the first write
its replica acknowledges (the writer following `CLUSTER SLOTS`): {redis_failover_text}.
{END}
"""
    write_section(BEGIN, END, section)
    with open("docs/benchmarks-cluster.svg", "w") as handle:
        handle.write(svg(bars))
    print(section)


BEGIN = "<!-- cluster: written by bench/cluster.sh -->"
END = "<!-- end of cluster -->"


def svg(bars):
    width, row, left = 680, 28, 200
    height = row * len(bars) + 60
    scale = (width - left - 40) / max(2.0, max(value for _, value in bars) * 1.1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-weight="bold">kv cluster ÷ Redis Cluster, ops/s (higher is better for kv)</text>']
    for index, (label, value) in enumerate(bars):
        y = 30 + index * row
        length = value * scale
        colour = "#2a7" if value >= 1 else "#c44"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{label}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{row - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 15}">{value:.2f}</text>')
    x = left + scale
    parts.append(f'<line x1="{x:.1f}" y1="26" x2="{x:.1f}" y2="{height - 24}" stroke="#555"/>')
    parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">1.0×</text>')
    parts.append("</svg>")
    return "\n".join(parts)



# --- Moves: a node joins a loaded cluster under load -------------------------------------

MOVE_PORTS = [4161, 4162, 4163, 4164]
MOVE_PEER_PORTS = [7511, 7512, 7513, 7514]
# Keys loaded into one bucket of each shard before the node joins: the size of a shard moved.
MOVE_KEYS = int(100_000 * max(SCALE, 0.1))
# The foreground load: closed-loop clients at depth 1, in back-to-back runs of this many
# requests (about a second each), so that each run's p99 tells when it ran.
MOVE_CLIENTS = 20
MOVE_RUN = int(20_000 * max(SCALE, 0.1))
MOVE_STEADY_RUNS = 8
MOVE_AFTER_RUNS = 3


def shard_lines(port):
    """{shard: (leads, voters, placed)} from a node's INFO cluster."""
    info = call(port, "INFO", "cluster") or ""
    shards = {}
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if not name.startswith("shard_"):
            continue
        fields = dict(field.split("=", 1) for field in value.split(",") if "=" in field)
        shards[int(name[len("shard_"):])] = (fields.get("role") == "leader", fields.get("voters"),
                                             fields.get("placed"))
    return shards


def move_watch(ports, stop, events):
    """Polls every node's INFO every 50 ms; records, for each shard, when its leader first
    reported voters other than its placement (a move started) and when they were equal again."""
    moving = {}
    while not stop.is_set():
        now = time.monotonic()
        leaders = {}
        for port in ports:
            try:
                for shard, (leads, voters, placed) in shard_lines(port).items():
                    if leads:
                        leaders[shard] = (voters, placed)
            except (OSError, ConnectionError, ValueError):
                continue
        for shard, (voters, placed) in leaders.items():
            if voters != placed and shard not in moving:
                moving[shard] = now
                events.append(("started", shard, now, voters, placed))
            elif voters == placed and shard in moving:
                events.append(("done", shard, now, voters, placed))
                del moving[shard]
        time.sleep(0.05)


def move_phase(tags):
    """A 3-node kv cluster with MOVE_KEYS keys in a bucket of each shard, under a steady load;
    a fourth node joins; the load's throughput and p99 per run before, during and after the
    moves, and how long each shard's move took."""
    servers = Servers()
    peers = ",".join(f"{i + 1}=127.0.0.1:{port}" for i, port in enumerate(MOVE_PEER_PORTS[:3]))

    def start(i, membership):
        directory = os.path.join(OUT, f"move{i + 1}")
        os.makedirs(directory, exist_ok=True)
        servers.start(f"move{i + 1}", [KV, "serve", "--port", str(MOVE_PORTS[i]), "--node-id", str(i + 1),
                                       "--cluster-bind", f"127.0.0.1:{MOVE_PEER_PORTS[i]}", *membership,
                                       "--data-dir", directory, *KV_FLAGS], f"move{i + 1}.log")

    try:
        for i in range(3):
            start(i, ["--peers", peers])
        wait_until(lambda: all("cluster_state:ok" in call(port, "CLUSTER", "INFO") for port in MOVE_PORTS[:3]),
                   "the kv cluster")
        created = pipeline(MOVE_PORTS[0], [command("CREATE", "b" + tag) for tag in tags])
        assert all(reply == "+OK" for reply in created), set(created)
        shards = 3
        for shard in range(shards):
            bucket = "b" + tags[shard * SLOTS // shards + 1]
            for start_at in range(0, MOVE_KEYS, 10_000):
                replies = pipeline(MOVE_PORTS[0], [command("PUT", bucket, f"k{n}", VALUE)
                                                   for n in range(start_at, min(start_at + 10_000, MOVE_KEYS))])
                assert all(reply == "+OK" for reply in replies), set(replies)
        print(f"loaded {MOVE_KEYS:,} keys in a bucket of each of {shards} shards", flush=True)
        words = ["PUT", "b{tag}", "key:__rand_int__", VALUE]
        runs = []
        events = []
        stop = threading.Event()
        watcher = threading.Thread(target=move_watch, args=(MOVE_PORTS, stop, events))
        watcher.start()
        joined_at = None
        after = 0
        while True:
            started = time.monotonic()
            argv = ["redis-benchmark", "-p", str(MOVE_PORTS[1]), "-c", str(MOVE_CLIENTS), "-r", str(KEYSPACE),
                    "-n", str(MOVE_RUN), "-P", "1", "--csv", "--cluster", *words]
            output = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
            fields = list(csv.reader(io.StringIO(output.strip().splitlines()[-1])))[0]
            # Throughput from the run's wall time: redis-benchmark's own figure moves in steps of
            # its 250 ms tick, a quarter of a run this short.
            ended = time.monotonic()
            runs.append(dict(start=started, end=ended, ops=MOVE_RUN / (ended - started),
                             p50=float(fields[4]), p99=float(fields[6])))
            print(runs[-1], flush=True)
            if joined_at is None and len(runs) == MOVE_STEADY_RUNS:
                joined_at = time.monotonic()
                start(3, ["--join", f"127.0.0.1:{MOVE_PEER_PORTS[0]}"])
            settled = joined_at is not None and any(e[0] == "started" for e in events) and \
                all(any(d[0] == "done" and d[1] == s[1] and d[2] >= s[2] for d in events)
                    for s in events if s[0] == "started")
            if settled:
                after += 1
                if after > MOVE_AFTER_RUNS:
                    break
            if len(runs) > 60:
                raise SystemExit("the moves did not finish within 60 runs")
        stop.set()
        watcher.join()
    finally:
        servers.stop_all()
    return runs, events, joined_at


def move_report(runs, events, joined_at):
    moves = []
    for kind, shard, at, voters, placed in events:
        if kind == "started":
            done = next(e for e in events if e[0] == "done" and e[1] == shard and e[2] >= at)
            moves.append((shard, at, done[2], voters, placed))
    first = min(at for _, at, _, _, _ in moves)
    last = max(done for _, _, done, _, _ in moves)
    steady = [r for r in runs if r["end"] <= joined_at]
    during = [r for r in runs if r["end"] > first and r["start"] < last]
    settled = [r for r in runs if r["start"] >= last]
    steady_p99 = statistics.median(r["p99"] for r in steady)
    steady_ops = statistics.median(r["ops"] for r in steady)
    rows = ["| runs | count | ops/s (median; min–max) | p99 ms (median; max) | max p99 ÷ steady p99 |",
            "|---|---|---|---|---|"]
    for name, chosen in (("steady, before the join", steady), ("during the moves", during),
                         ("after the moves", settled)):
        if not chosen:
            rows.append(f"| {name} | 0 | | | |")
            continue
        rows.append(f"| {name} | {len(chosen)} | {statistics.median(r['ops'] for r in chosen):,.0f} "
                    f"({min(r['ops'] for r in chosen):,.0f}–{max(r['ops'] for r in chosen):,.0f}) | "
                    f"{statistics.median(r['p99'] for r in chosen):.2f}; {max(r['p99'] for r in chosen):.2f} | "
                    f"{max(r['p99'] for r in chosen) / steady_p99:.2f} |")
    move_lines = [f"- shard {shard}: voters {voters} to {placed} in {done - at:.2f} s "
                  f"(started {at - joined_at:.2f} s after the node was started)"
                  for shard, at, done, voters, placed in sorted(moves, key=lambda m: m[1])]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    section = f"""{MOVES_BEGIN}
## A node joining a loaded cluster

Measured {datetime.date.today()} by `bash bench/cluster.sh` (SCALE={SCALE}) at kv commit `{commit}`:
a 3-node kv cluster (default flags) with {MOVE_KEYS:,} keys (32-byte values) in a bucket of each
of its three shards, under `redis-benchmark --cluster -c {MOVE_CLIENTS} -P 1` PUTs in back-to-back
runs of {MOVE_RUN:,} requests (throughput from each run's wall time, start-up included);
after {MOVE_STEADY_RUNS} runs a fourth node is started with `--join`.
A shard's move is timed from when its leader first reports voters other than the layout's
placement to when they are the placement again (polled every 50 ms): adding the new node as a
learner, sending it the shard's snapshot and log, and replacing a voter. Steady throughput
{steady_ops:,.0f} ops/s, p99 {steady_p99:.2f} ms.

{chr(10).join(rows)}

{chr(10).join(move_lines)}
{MOVES_END}
"""
    write_section(MOVES_BEGIN, MOVES_END, section)
    print(section)


MOVES_BEGIN = "<!-- moves: written by bench/cluster.sh -->"
MOVES_END = "<!-- end of moves -->"


def write_section(begin, end, section):
    """Puts `section` (which starts with `begin` and ends with `end`) into docs/benchmarks.md,
    in place of the one there if any."""
    path = "docs/benchmarks.md"
    existing = open(path).read() if os.path.exists(path) else "# kv against Redis\n"
    if begin in existing:
        head, rest = existing.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        existing = head.rstrip("\n") + "\n\n" + section + tail
    else:
        existing = existing.rstrip("\n") + "\n\n" + section
    with open(path, "w") as handle:
        handle.write(existing)

if __name__ == "__main__":
    sys.exit(main())
