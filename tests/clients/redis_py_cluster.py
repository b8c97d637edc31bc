"""redis-py's RedisCluster, with its defaults, against a 3-node kv cluster: it maps the slots
(CLUSTER SLOTS) and the commands' keys (COMMAND: a bucket command's key is the bucket), sends
each command to its slot's master, splits a pipeline by node, and rides out a node killed
with SIGKILL. Run by tests/real_clients.rs:

    python3 tests/clients/redis_py_cluster.py PORT VICTIM_PID

PORT is one node's client port; VICTIM_PID a node's process, killed halfway. Exits non-zero
with the failing check on the first failure."""

import os
import signal
import sys
import time

import redis
from redis.cluster import RedisCluster

port, victim = int(sys.argv[1]), int(sys.argv[2])
cluster = RedisCluster(host="127.0.0.1", port=port)

# Buckets on every node's slots, so that every master is sent commands.
buckets = [f"bucket{n}" for n in range(24)]
masters = {cluster.get_node_from_key(bucket).name for bucket in buckets}
assert len(masters) == 3, f"the buckets' masters: {masters}"
for bucket in buckets:
    assert cluster.execute_command("CREATE", bucket) in (b"OK", True, "OK"), bucket
    cluster.execute_command("PUT", bucket, "milk", f"{bucket}-1")
for bucket in buckets:
    assert cluster.execute_command("GET", bucket, "milk") == f"{bucket}-1".encode(), bucket
assert cluster.execute_command("GET", buckets[0], "nothing") is None

# A cluster pipeline: each node's share sent to it, the replies back in the commands' order.
pipeline = cluster.pipeline()
for bucket in buckets:
    pipeline.execute_command("PUT", bucket, "eggs", f"{bucket}-eggs")
for bucket in buckets:
    pipeline.execute_command("GET", bucket, "eggs")
replies = pipeline.execute()
assert replies[: len(buckets)] == [b"OK"] * len(buckets), replies
assert replies[len(buckets) :] == [f"{b}-eggs".encode() for b in buckets], replies

# A node killed: the shards it led elect new leaders, and the client finds them. A write the
# client was told failed may or may not have been made, so it is made again until one is
# acknowledged; every read must then see the last acknowledged value.
os.kill(victim, signal.SIGKILL)
deadline = time.monotonic() + 30
failures = []
for turn in range(3):
    for bucket in buckets:
        while True:
            try:
                put = cluster.execute_command("PUT", bucket, "milk", f"{bucket}-{turn + 2}")
                assert put in (b"OK", True, "OK"), put
                break
            except (redis.exceptions.RedisError, ConnectionError) as error:
                failures.append(f"{type(error).__name__}: {error}")
                assert time.monotonic() < deadline, f"no write acknowledged within 30 s: {failures[-5:]}"
                time.sleep(0.05)
for bucket in buckets:
    assert cluster.execute_command("GET", bucket, "milk") == f"{bucket}-4".encode(), bucket
print(f"RedisCluster: ok ({len(failures)} failed attempts while the killed node's shards moved)")
