"""How long a 3-node kv cluster stops answering while one shard fills with large values: its
snapshots, log purges and log rewrites all run while a client writes. Pings every node every
5 ms (a PING on its own connection) and reports the longest wait per node, how long the write
batches took (the longest, the median), how many got TRYAGAIN, and whether any shard elected a
new leader meanwhile. Then a node that
was killed before the fill (one not leading the shard) is restarted and catches up, from a
snapshot of the whole shard: the longest PING wait on it until it has caught up.

    python3 bench/cluster_stall.py [KEYS] [VALUE_BYTES]    # default 120000 keys of 4000 bytes

Uses target/release/kv (build it first: cargo build --release), or the binary $KV names.
Writes nothing in docs/."""
import os
import shutil
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster as c  # noqa: E402

KEYS = int(sys.argv[1]) if len(sys.argv) > 1 else 120_000
VALUE_BYTES = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
PORTS = [4241, 4242, 4243]
PEER_PORTS = [7601, 7602, 7603]
BATCH = 200
c.KV = os.path.abspath(os.environ.get("KV", c.KV))


def pinger(port, stop, worst):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        while not stop.is_set():
            started = time.monotonic()
            s.sendall(c.command("PING"))
            answer = b""
            while not answer.endswith(b"\r\n"):
                answer += s.recv(100)
            worst[port] = max(worst[port], time.monotonic() - started)
            time.sleep(0.005)


def shard_field(port, shard, field):
    for line in c.call(port, "INFO").splitlines():
        if line.startswith(f"shard_{shard}:"):
            return int(line.split(f"{field}=")[1].split(",")[0])
    return -1


def terms_of(ports):
    return {port: [line.split("term=")[1].split(",")[0] for line in c.call(port, "INFO").splitlines()
                   if line.startswith("shard_")] for port in ports}


def leader_and_shard_of(tag):
    """The client port of the node leading the bucket tag's shard, and the shard's number (the
    shards hold the slots in order)."""
    slot = c.crc16(tag.strip("{}").encode()) % c.SLOTS
    ranges = []
    for line in c.call(PORTS[0], "CLUSTER", "NODES").splitlines():
        fields = line.split()
        port = int(fields[1].split(":")[1].split("@")[0])
        for slots in fields[8:]:
            first, _, last = slots.partition("-")
            ranges.append((int(first), int(last or first), port))
    ranges.sort()
    for shard, (first, last, port) in enumerate(ranges):
        if first <= slot <= last:
            return port, shard
    raise RuntimeError(f"no leader for slot {slot}")


def node_argv(i, peers, out):
    directory = os.path.join(out, f"n{i + 1}")
    os.makedirs(directory, exist_ok=True)
    return [c.KV, "serve", "--port", str(PORTS[i]), "--node-id", str(i + 1),
            "--cluster-bind", f"127.0.0.1:{PEER_PORTS[i]}", "--peers", peers, "--data-dir", directory]


def main():
    out = os.path.abspath("target/cluster-stall")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    c.OUT = out
    servers = c.Servers()
    peers = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(PEER_PORTS))
    try:
        for i in range(len(PORTS)):
            servers.start(f"n{i + 1}", node_argv(i, peers, out), f"n{i + 1}.log")
        c.wait_until(lambda: all("cluster_state:ok" in c.call(p, "CLUSTER", "INFO") for p in PORTS), "cluster ok")
        c.wait_until(lambda: c.led_slots(c.call(PORTS[0], "CLUSTER", "NODES")), "leaders spread")
        tag = c.slot_tags()[0]
        leader, shard = leader_and_shard_of(tag)
        assert c.call(leader, "CREATE", "b" + tag) == "+OK"
        victim = next(i for i, port in enumerate(PORTS) if port != leader)
        servers.kill(f"n{victim + 1}")
        live = [port for i, port in enumerate(PORTS) if i != victim]
        c.wait_until(lambda: all(f"leader={victim + 1}," not in line and "leader=0," not in line
                                 for port in live for line in c.call(port, "INFO").splitlines()
                                 if line.startswith("shard_")), "the killed node's shards led elsewhere")
        before = terms_of(live)
        stop, worst = threading.Event(), {port: 0.0 for port in PORTS}
        pingers = [threading.Thread(target=pinger, args=(port, stop, worst), daemon=True) for port in live]
        for thread in pingers:
            thread.start()
        value, retried, started = "v" * VALUE_BYTES, 0, time.monotonic()
        batch_times = []
        for first in range(0, KEYS, BATCH):
            batch = [c.command("PUT", "b" + tag, f"k{i}", value) for i in range(first, min(KEYS, first + BATCH))]
            sent = time.monotonic()
            while True:
                refused = [r for r in c.pipeline(leader, batch) if r != "+OK"]
                if not refused:
                    break
                assert all("TRYAGAIN" in r for r in refused), refused[:3]
                retried += 1
                time.sleep(0.1)
            batch_times.append(time.monotonic() - sent)
        filled = time.monotonic() - started
        time.sleep(3)
        stop.set()
        for thread in pingers:
            thread.join()
        after = terms_of(live)
        print(f"{KEYS} PUTs of {VALUE_BYTES} bytes to one shard in {filled:.1f} s "
              f"({KEYS * VALUE_BYTES / filled / 2**20:.0f} MiB/s), node {victim + 1} down; "
              f"batches answered TRYAGAIN: {retried}")
        batch_times.sort()
        print(f"write batches of {BATCH} PUTs: median {batch_times[len(batch_times) // 2] * 1000:.0f} ms, "
              f"longest {batch_times[-1] * 1000:.0f} ms, over 250 ms: "
              f"{sum(t > 0.25 for t in batch_times)}")
        print("longest PING wait per node:", ", ".join(f"{port}: {worst[port] * 1000:.0f} ms" for port in live))
        print("elections during the fill:", "none" if before == after else f"terms {before} then {after}")

        target = shard_field(leader, shard, "last_log")
        servers.start(f"n{victim + 1}", node_argv(victim, peers, out), f"n{victim + 1}-again.log")
        port = PORTS[victim]
        c.wait_until(lambda: c.call(port, "PING") == "+PONG", "restarted node")
        stop = threading.Event()
        pinging = threading.Thread(target=pinger, args=(port, stop, worst), daemon=True)
        started = time.monotonic()
        pinging.start()
        c.wait_until(lambda: shard_field(port, shard, "applied") >= target, "caught up", timeout=120)
        caught_up = time.monotonic() - started
        stop.set()
        pinging.join()
        print(f"node {victim + 1} restarted caught up in {caught_up:.1f} s; "
              f"longest PING wait on it meanwhile {worst[port] * 1000:.0f} ms")
    finally:
        servers.stop_all()


if __name__ == "__main__":
    main()
