"""redis-py, with its defaults (RESP3 through `HELLO 3`, a client name, `CLIENT SETINFO`,
pipelines with and without MULTI/EXEC), against a running kv. Run by tests/real_clients.rs:

    python3 tests/clients/redis_py.py PORT PASSWORD

Exits non-zero with the failing check on the first failure."""

import sys

import redis

port, password = int(sys.argv[1]), sys.argv[2]
major = int(redis.__version__.split(".")[0])
assert major >= 8, f"redis-py {redis.__version__}: these checks are for 8.x"

# Without the password, the server says so.
try:
    redis.Redis(port=port).ping()
    raise AssertionError("served without a password")
except redis.exceptions.AuthenticationError:
    pass

r = redis.Redis(port=port, password=password, client_name="kv-check")
assert r.ping() is True
assert r.execute_command("CREATE", "shopping") in (b"OK", True, "OK")
r.execute_command("PUT", "shopping", "milk", b"\x00one\r\n")
assert r.execute_command("GET", "shopping", "milk") == b"\x00one\r\n"
assert r.execute_command("GET", "shopping", "nothing") is None

# A transaction (the default pipeline) and a plain pipeline.
pipe = r.pipeline()
pipe.execute_command("PUT", "shopping", "eggs", "3")
pipe.execute_command("GET", "shopping", "eggs")
replies = pipe.execute()
assert replies[1] == b"3", replies
pipe = r.pipeline(transaction=False)
for index in range(100):
    pipe.execute_command("PUT", "shopping", f"k{index}", str(index))
pipe.execute_command("GET", "shopping", "k42")
assert pipe.execute()[-1] == b"42"

# What the connection says of itself, and the server of itself.
assert r.client_getname() == "kv-check"
assert r.client_id() > 0
names = [client.get("name") for client in r.client_list()]
assert "kv-check" in names, names
assert r.dbsize() == 102
info = r.info()
assert info["redis_version"], info
assert info["db0"]["keys"] == 102, info["db0"]
assert "connected_clients" in r.info("clients")
assert r.config_get("maxmemory") == {"maxmemory": "4294967296"}
for index in range(5):
    r.execute_command("CREATE", f"other-{index}")
assert sorted(r.scan_iter(match="other-*", count=2)) == [f"other-{i}".encode() for i in range(5)]

# Errors name the problem.
try:
    r.execute_command("FLY", "away")
    raise AssertionError("no error")
except redis.exceptions.ResponseError as error:
    assert "unknown command 'FLY'" in str(error), error
try:
    r.execute_command("GET", "nowhere", "k")
    raise AssertionError("no error")
except redis.exceptions.ResponseError as error:
    assert "NOTFOUND" in str(error) or "bucket does not exist" in str(error), error
try:
    r.set("key", "value")
    raise AssertionError("no error")
except redis.exceptions.ResponseError as error:
    assert "PUT bucket key value" in str(error), error

# db=0 is the one database; another is refused clearly.
assert redis.Redis(port=port, password=password, db=0).ping()
try:
    redis.Redis(port=port, password=password, db=1).ping()
    raise AssertionError("db 1 accepted")
except redis.exceptions.ResponseError as error:
    assert "one database" in str(error), error

# RESP2 still works when asked for.
r2 = redis.Redis(port=port, password=password, protocol=2)
assert r2.execute_command("GET", "shopping", "eggs") == b"3"
print("redis-py", redis.__version__, "ok")
