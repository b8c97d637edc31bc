#!/usr/bin/env python3
"""Whether kv gives memory back to the system after a burst: resident memory (INFO's
resident_bytes, from /proc) before, at the peak and after, for
  - one million buckets created and then dropped, and
  - many clients fetching a large value at once (large reply buffers), then idling.

    python3 bench/give_back.py [path/to/kv]     # default target/release/kv

Bounded: a fixed number of requests, each step at most SETTLE_SECONDS of waiting; the server
is started on a free loopback port and stopped at the end.
"""

import os
import re
import socket
import subprocess
import sys
import time

BUCKETS = int(os.environ.get("BUCKETS", 1_000_000))
BATCH = 10_000
LARGE = 4 * 1024 * 1024
READERS = int(os.environ.get("READERS", 64))
SETTLE_SECONDS = float(os.environ.get("SETTLE_SECONDS", 20))


def start(binary):
    server = subprocess.Popen(
        [binary, "serve", "--max-buckets", str(BUCKETS + 10)],
        env={**os.environ, "PORT": "0", "RUST_LOG": "warn,kv=info"},
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in server.stderr:
        found = re.search(r"kv listening on (\S+):(\d+)", line)
        if found:
            return server, (found.group(1), int(found.group(2)))
    raise SystemExit("the server exited before listening")


def connect(address):
    connection = socket.create_connection(address, timeout=60)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def read_replies(connection, count, terminator=b"OK\r\n"):
    """Reads until `count` lines equal to `terminator` have come (line protocol)."""
    buffer = b""
    seen = 0
    while seen < count:
        chunk = connection.recv(1 << 20)
        if not chunk:
            raise SystemExit("the server closed the connection")
        buffer += chunk
        lines = buffer.split(b"\r\n")
        buffer = lines.pop()
        seen += sum(1 for line in lines if line + b"\r\n" == terminator)


def pipeline(connection, requests):
    connection.sendall(b"".join(requests))
    read_replies(connection, len(requests))


def resident(address):
    connection = connect(address)
    connection.sendall(b"INFO\n")
    text = b""
    while not text.endswith(b"OK\r\n"):
        text += connection.recv(65536)
    connection.close()
    return int(re.search(rb"resident_bytes:(\d+)", text).group(1))


def settle(address, floor):
    """Resident memory once it has reached `floor`, or after SETTLE_SECONDS (an allocator
    may give memory back gradually: jemalloc over about ten seconds)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    now = resident(address)
    while time.monotonic() < deadline and now > floor:
        time.sleep(1)
        now = resident(address)
    return now


def mib(value):
    return f"{value / (1 << 20):.0f} MiB"


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/kv"
    server, address = start(binary)
    try:
        baseline = resident(address)
        connection = connect(address)
        for first in range(0, BUCKETS, BATCH):
            pipeline(connection, [f"CREATE b{index}\n".encode() for index in range(first, first + BATCH)])
        peak = resident(address)
        for first in range(0, BUCKETS, BATCH):
            pipeline(connection, [f"DROP b{index}\n".encode() for index in range(first, first + BATCH)])
        after = settle(address, baseline)
        print(f"{BUCKETS} buckets: baseline {mib(baseline)}, with them {mib(peak)}, "
              f"after dropping them {mib(after)}")

        value = b"v" * LARGE
        connection.sendall(b"*2\r\n$6\r\nCREATE\r\n$5\r\nlarge\r\n")
        connection.recv(100)
        connection.sendall(b"*4\r\n$3\r\nPUT\r\n$5\r\nlarge\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (LARGE, value))
        stored = connection.recv(100)
        if stored != b"+OK\r\n":
            raise SystemExit(f"storing the large value: {stored!r}")
        before = resident(address)
        readers = [connect(address) for _ in range(READERS)]
        peak = before
        # Twice: after the first large buffers are freed, glibc's malloc serves the next ones
        # from its heap instead of mapping them afresh, and keeps them.
        for _ in range(2):
            for reader in readers:
                reader.sendall(b"*3\r\n$3\r\nGET\r\n$5\r\nlarge\r\n$1\r\nk\r\n")
            # The replies wait in the server's buffers until the clients read them.
            time.sleep(1)
            peak = max(peak, resident(address))
            for reader in readers:
                expected = len(b"$%d\r\n" % LARGE) + LARGE + 2
                got = 0
                while got < expected:
                    chunk = reader.recv(1 << 20)
                    if not chunk:
                        raise SystemExit("the server closed a reader")
                    got += len(chunk)
        after = settle(address, before)
        print(f"{READERS} clients fetching {mib(LARGE)} each, twice: before {mib(before)}, "
              f"at the peak {mib(peak)}, after {mib(after)} (connections still open)")
        for reader in readers:
            reader.close()
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
