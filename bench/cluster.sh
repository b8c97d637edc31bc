#!/usr/bin/env bash
# A 3-node kv cluster against Redis Cluster (3 masters, one replica each, persistence off), and
# a kv single node beside them: the same redis-benchmark --cluster workloads, interleaved;
# idle CPU; failover time after kill -9; and a fourth node joining a loaded kv cluster under load
# (throughput and p99 during the moves, and each shard's move time). See bench/cluster.py.
#
#   bash bench/cluster.sh                        # full run (about twelve minutes)
#   ROUNDS=1 SCALE=0.1 bash bench/cluster.sh     # a quick look
#   ONLY=moves bash bench/cluster.sh             # the node joining alone
#
# Installs redis-server and redis-tools with apt-get if missing and builds kv in release mode.
# Writes the cluster section of docs/benchmarks.md and docs/benchmarks-cluster.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-server and redis-tools"
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet
exec python3 bench/cluster.py
