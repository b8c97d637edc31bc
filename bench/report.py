#!/usr/bin/env python3
"""Turns bench/compare.sh's measurements into a table of medians and kv/Redis ratios,
docs/benchmarks.md, and docs/benchmarks.svg. Standard library only."""

import csv
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
from collections import defaultdict

results_path, memory_path, redis_version, command, kv_workers, second_flags = sys.argv[1:7]
startup_path = os.path.join(os.path.dirname(results_path), "startup.txt")

runs = defaultdict(list)
with open(results_path) as handle:
    for row in csv.DictReader(handle):
        runs[(row["server"], row["workload"], int(row["depth"]))].append(row)


def median(server, workload, depth, field):
    values = [float(row[field]) for row in runs.get((server, workload, depth), []) if row[field]]
    return statistics.median(values) if values else None


def median_interval(values, resamples=2000):
    """A 95% bootstrap interval of the median of `values`: how far the median itself may be
    off, given how much single values vary. Seeded, so a report is reproducible."""
    generator = random.Random(0)
    medians = sorted(statistics.median(generator.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def paired_ratio(kv_key, redis_key):
    """kv's runs against Redis's of the same label (round, and repeat at depth 1), which ran
    seconds apart: the median of their ratios, its 95% interval, and how many pairs there were.
    A pair shares the machine's state of the moment, so the ratio drifts less than either side."""
    redis_by_label = {row["round"]: float(row["ops_per_second"]) for row in runs.get(redis_key, [])}
    ratios = [float(row["ops_per_second"]) / redis_by_label[row["round"]]
              for row in runs.get(kv_key, []) if redis_by_label.get(row["round"])]
    if not ratios:
        return None
    low, high = median_interval(ratios)
    return statistics.median(ratios), low, high, len(ratios)


def fmt_ops(value):
    return f"{value / 1e6:.3f} M/s" if value is not None else "n/a"


def fmt(value, digits=2):
    return f"{value:.{digits}f}" if value is not None else "n/a"


def runs_per_depth(depth):
    return len({row["round"] for (server, _, row_depth), rows in runs.items()
                if server == "redis" and row_depth == depth for row in rows})


rounds, depth1_runs = runs_per_depth(16), runs_per_depth(1)
pairs = [("PUT", "SET"), ("PUT", "HSET"), ("GET", "GET"), ("GET", "HGET")]
lines = []
lines.append("| kv serves with | depth | kv | Redis | kv ops/s | Redis ops/s | ratio (95% interval) | pairs "
             "| kv p99 ms | Redis p99 ms | kv CPU µs/req | Redis CPU µs/req |")
lines.append("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
plot = []
kv_servers = [("kv", "its defaults" if "KV_THREADS=default" in command else "KV_THREADS")]
if second_flags:
    kv_servers.append(("kv-second", f"`{second_flags}`"))
for kv_server, settings in kv_servers:
    for depth in (16, 1):
        for kv_workload, redis_workload in pairs:
            kv_ops = median(kv_server, kv_workload, depth, "ops_per_second")
            redis_ops = median("redis", redis_workload, depth, "ops_per_second")
            paired = paired_ratio((kv_server, kv_workload, depth), ("redis", redis_workload, depth))
            if kv_server == "kv":
                plot.append((f"{kv_workload}/{redis_workload} P{depth}", paired[0] if paired else None))
            ratio = f"**{paired[0]:.2f}** ({paired[1]:.2f}–{paired[2]:.2f})" if paired else "n/a"
            lines.append(
                f"| {settings} | {depth} | {kv_workload} | {redis_workload} | {fmt_ops(kv_ops)} "
                f"| {fmt_ops(redis_ops)} | {ratio} | {paired[3] if paired else 0} "
                f"| {fmt(median(kv_server, kv_workload, depth, 'p99_ms'), 3)} "
                f"| {fmt(median('redis', redis_workload, depth, 'p99_ms'), 3)} "
                f"| {fmt(median(kv_server, kv_workload, depth, 'cpu_us_per_request'))} "
                f"| {fmt(median('redis', redis_workload, depth, 'cpu_us_per_request'))} |")
throughput_table = "\n".join(lines)

lines = ["| kv bench (50 connections, depth 16, 90% GET / 10% PUT, 100,000 keys) | ops/s | p50 ms | p99 ms |",
         "|---|---:|---:|---:|"]
bench_ops = {}
for protocol in ("resp", "line"):
    for buckets in (1, 10000):
        workload = f"kvbench-{protocol}-{buckets}b"
        ops = median("kv", workload, 16, "ops_per_second")
        bench_ops[(protocol, buckets)] = ops
        lines.append(f"| {protocol}, {buckets:,} bucket{'s' if buckets > 1 else ''} | {fmt_ops(ops)} "
                     f"| {fmt(median('kv', workload, 16, 'p50_ms'), 3)} | {fmt(median('kv', workload, 16, 'p99_ms'), 3)} |")
for protocol in ("resp", "line"):
    # Each pair ran back to back: the median of the pairs' ratios, with their range.
    by_pair = defaultdict(dict)
    for buckets in (1, 10000):
        for row in runs.get(("kv", f"kvbench-{protocol}-{buckets}b", 16), []):
            by_pair[row["round"]][buckets] = float(row["ops_per_second"])
    ratios = [pair[10000] / pair[1] for pair in by_pair.values() if len(pair) == 2]
    if ratios:
        low, high = median_interval(ratios)
        lines.append(f"| {protocol}: 10,000 buckets / 1 bucket, median of {len(ratios)} pairs "
                     f"(range {min(ratios):.2f}–{max(ratios):.2f}; 95% interval of the median "
                     f"{low:.2f}–{high:.2f}) | **{statistics.median(ratios):.2f}** | | |")
bench_table = "\n".join(lines)

lines = ["| server | keys | RSS at start | RSS loaded | RSS per key (loaded / keys) | RSS growth per key | accounted per key |",
         "|---|---:|---:|---:|---:|---:|---:|"]
memory_rows = {}
with open(memory_path) as handle:
    for row in csv.DictReader(handle):
        keys = int(row["keys"])
        start, loaded = int(row["rss_start"]), int(row["rss_loaded"])
        used = int(row["used_memory"]) if row["used_memory"] else None
        memory_rows[row["server"]] = loaded / keys
        name = {"redis-set": "Redis, SET", "redis-hset": "Redis, HSET in one hash", "kv": "kv, one bucket"}[row["server"]]
        accounted = f"{used / keys:.0f} B" if used else "n/a"
        lines.append(f"| {name} | {keys:,} | {start / 2**20:.1f} MiB | {loaded / 2**20:.1f} MiB "
                     f"| **{loaded / keys:.0f} B** | {(loaded - start) / keys:.0f} B | {accounted} |")
memory_table = "\n".join(lines)
lines = ["| fsync | depth | kv PUT ops/s | Redis SET ops/s | kv ÷ SET | Redis HSET ops/s | kv ÷ HSET "
         "| kv p99 ms | Redis SET p99 ms | Redis SET lost to AOF |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
durable_found = False
for fsync in ("everysec", "always"):
    for depth in (16, 1):
        kv_ops = median(f"kv-{fsync}", "PUT", depth, "ops_per_second")
        redis_set = median(f"redis-aof-{fsync}", "SET", depth, "ops_per_second")
        redis_hset = median(f"redis-aof-{fsync}", "HSET", depth, "ops_per_second")
        plain_set = median("redis", "SET", depth, "ops_per_second")
        if kv_ops is None or redis_set is None:
            continue
        durable_found = True
        lost = f"{(1 - redis_set / plain_set) * 100:.0f}%" if plain_set else "n/a"
        lines.append(
            f"| {fsync} | {depth} | {fmt_ops(kv_ops)} | {fmt_ops(redis_set)} | **{kv_ops / redis_set:.2f}** "
            f"| {fmt_ops(redis_hset)} | **{fmt(kv_ops / redis_hset if redis_hset else None)}** "
            f"| {fmt(median(f'kv-{fsync}', 'PUT', depth, 'p99_ms'), 3)} "
            f"| {fmt(median(f'redis-aof-{fsync}', 'SET', depth, 'p99_ms'), 3)} | {lost} |")
        plot.append((f"PUT/SET {fsync} P{depth}", kv_ops / redis_set))
durable_table = "\n".join(lines) if durable_found else "(not measured in this run)"
startup = open(startup_path).read().strip() if os.path.exists(startup_path) else "(not measured in this run)"
startup_keys = next((f"{int(field[5:]):,}" for field in startup.split() if field.startswith("keys=")), "the")

if "kv" in memory_rows and "redis-set" in memory_rows:
    plot.append(("memory/key (Redis SET ÷ kv)", memory_rows["redis-set"] / memory_rows["kv"]))


def svg(bars):
    width, row, left = 680, 28, 230
    height = row * len(bars) + 60
    scale = (width - left - 40) / max(2.0, max((value or 0) for _, value in bars) * 1.1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="18" font-weight="bold">kv ÷ Redis (higher is better for kv)</text>']
    for index, (label, value) in enumerate(bars):
        y = 30 + index * row
        length = (value or 0) * scale
        colour = "#2a7" if (value or 0) >= 1 else "#c44"
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{label}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{length:.1f}" height="{row - 8}" fill="{colour}"/>')
        parts.append(f'<text x="{left + length + 4:.1f}" y="{y + 15}">{fmt(value)}</text>')
    for mark in (1.0, 1.2):
        x = left + mark * scale
        parts.append(f'<line x1="{x:.1f}" y1="26" x2="{x:.1f}" y2="{height - 24}" stroke="#555" '
                     f'stroke-dasharray="{"4,3" if mark > 1 else "none"}"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">{mark:.1f}×</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def machine():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, Linux {platform.release()}"


def kv_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


os.makedirs("docs", exist_ok=True)
with open("docs/benchmarks.svg", "w") as handle:
    handle.write(svg(plot))

second_kv = (f"; a second kv beside it with `{second_flags}` gives the second set of rows"
             if second_flags else "")
report = f"""# kv against Redis

Measured {datetime.date.today()} by `{command}` at kv commit `{kv_commit()}`, on {machine()}.
Load generator and server share the machine's cores over loopback. Redis {redis_version}, persistence
off. kv with its defaults, which on this machine gave `{kv_workers}`{second_kv}. Runs are interleaved
(A B A B, the order alternating): {rounds} rounds, with {depth1_runs} runs of each workload at depth 1
(three per round by default), where the load generator bounds both servers and single runs
move most. Ops/s, latency and CPU are medians over the runs. A ratio is the median of the
kv ÷ Redis ratios of runs made seconds apart in the same round, with a 95% bootstrap interval
of that median: this machine is shared and noisy (±10% between runs), and a pair's ratio
drifts less than either side. Read the ratios and their intervals.

![kv ÷ Redis](benchmarks.svg)

## redis-benchmark, same client and workload for both

50 clients, `-r 100000` keyspace, 32-byte values. Redis runs `SET`/`GET key:__rand_int__` and
`HSET`/`HGET shopping key:__rand_int__`; kv runs `PUT`/`GET shopping key:__rand_int__` over RESP.
Server CPU per request is the server's user+system time over the run divided by its requests.

{throughput_table}

## kv bench against kv

Every reply is checked (a wrong one fails the run). Keys are preloaded; key *i* lives in bucket
*i* mod *buckets*. Runs come in pairs, 1 bucket and 10,000 back to back (the order
alternating); ops/s are medians over all runs, the ratio is the median of the pairs' ratios.

{bench_table}

## Memory

One million 16-byte keys (`key:000000000000` …) with 32-byte values, loaded into a fresh server.
RSS from `/proc/PID/status`; "accounted" is Redis's `used_memory` and kv's `memory_used_bytes`
(an estimate that the memory limit is enforced against).

{memory_table}

## Durability

Redis with `appendonly yes` and kv with `--data-dir`, at the same fsync policy, both writing to
this machine's disk; the same redis-benchmark workloads as above. "Lost to AOF" compares Redis
with itself without persistence in the same run.

{durable_table}

kv's start-up with {startup_keys} keys (16-byte keys, 32-byte values) in its log, from its own log
line: `{startup}`.
"""
# bench/cluster.sh writes its own section of the same page: keep it.
CLUSTER_BEGIN = "<!-- cluster: written by bench/cluster.sh -->"
CLUSTER_END = "<!-- end of cluster -->"
try:
    previous = open("docs/benchmarks.md").read()
except OSError:
    previous = ""
if CLUSTER_BEGIN in previous and CLUSTER_END in previous:
    cluster = previous[previous.index(CLUSTER_BEGIN):previous.index(CLUSTER_END) + len(CLUSTER_END)]
    report = report.rstrip("\n") + "\n\n" + cluster + "\n"
with open("docs/benchmarks.md", "w") as handle:
    handle.write(report)
print(report)
