"""How long a 3-node kv cluster stops answering while one shard fills with large values: its
snapshots, log purges and log rewrites all run while a client writes. Pings every node every
5 ms (a PING on its own connection) and reports the longest wait per node, how many write
batches got TRYAGAIN, and whether any shard elected a new leader meanwhile.

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


def terms():
    return {port: [line.split("term=")[1].split(",")[0] for line in c.call(port, "INFO").splitlines()
                   if line.startswith("shard_")] for port in PORTS}


def leader_of(tag):
    slot = c.crc16(tag.strip("{}").encode()) % c.SLOTS
    for line in c.call(PORTS[0], "CLUSTER", "NODES").splitlines():
        fields = line.split()
        for slots in fields[8:]:
            first, _, last = slots.partition("-")
            if int(first) <= slot <= int(last or first):
                return int(fields[1].split(":")[1].split("@")[0])
    raise RuntimeError(f"no leader for slot {slot}")


def main():
    out = os.path.abspath("target/cluster-stall")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    c.OUT = out
    servers = c.Servers()
    peers = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(PEER_PORTS))
    try:
        for i, port in enumerate(PORTS):
            directory = os.path.join(out, f"n{i + 1}")
            os.makedirs(directory)
            servers.start(f"n{i + 1}", [c.KV, "serve", "--port", str(port), "--node-id", str(i + 1),
                                        "--cluster-bind", f"127.0.0.1:{PEER_PORTS[i]}", "--peers", peers,
                                        "--data-dir", directory], f"n{i + 1}.log")
        c.wait_until(lambda: all("cluster_state:ok" in c.call(p, "CLUSTER", "INFO") for p in PORTS), "cluster ok")
        c.wait_until(lambda: c.led_slots(c.call(PORTS[0], "CLUSTER", "NODES")), "leaders spread")
        tag = c.slot_tags()[0]
        leader = leader_of(tag)
        assert c.call(leader, "CREATE", "b" + tag) == "+OK"
        before = terms()
        stop, worst = threading.Event(), {port: 0.0 for port in PORTS}
        pingers = [threading.Thread(target=pinger, args=(port, stop, worst), daemon=True) for port in PORTS]
        for thread in pingers:
            thread.start()
        value, retried, started = "v" * VALUE_BYTES, 0, time.monotonic()
        for first in range(0, KEYS, BATCH):
            batch = [c.command("PUT", "b" + tag, f"k{i}", value) for i in range(first, min(KEYS, first + BATCH))]
            while True:
                refused = [r for r in c.pipeline(leader, batch) if r != "+OK"]
                if not refused:
                    break
                assert all("TRYAGAIN" in r for r in refused), refused[:3]
                retried += 1
                time.sleep(0.1)
        filled = time.monotonic() - started
        time.sleep(3)
        stop.set()
        for thread in pingers:
            thread.join()
        after = terms()
        print(f"{KEYS} PUTs of {VALUE_BYTES} bytes to one shard in {filled:.1f} s "
              f"({KEYS * VALUE_BYTES / filled / 2**20:.0f} MiB/s); batches answered TRYAGAIN: {retried}")
        print("longest PING wait per node:", ", ".join(f"{port}: {worst[port] * 1000:.0f} ms" for port in PORTS))
        print("elections during the fill:", "none" if before == after else f"terms {before} then {after}")
    finally:
        servers.stop_all()


if __name__ == "__main__":
    main()
