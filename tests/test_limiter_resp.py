"""The limiter's own RESP2 client (redisconn/resp.py) against real redis-server processes.

The parser is also checked alone, against every way a byte stream can be cut.
Event-loop tests run on asyncio and on uvloop (the gateway's loop).
Time-based checks wait with deadlines; a paused server is SIGSTOPped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    InvalidResponse,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)

from limiter.base import LimitRule
from limiter.failover import FAIL_CLOSED, FailoverLimiter
from limiter.memory import MemoryLimiter
from limiter.redis_limiter import RedisLimiter
from redisconn.connect import connect, lean_client
from redisconn.resp import RespAddress, RespClient, RespParser, encode_command
from tests.support.redis_servers import RedisServer, free_port
from tests.test_fuzz_support import examples

pytestmark = pytest.mark.timeout(60)

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def single_node(url: str, *, timeout_ms: int, max_connections: int) -> AsyncRedis:
    """connect() for a single-node URL, typed as the client lean_client takes."""
    client = connect(url, timeout_ms=timeout_ms, max_connections=max_connections)
    assert isinstance(client, AsyncRedis)
    return client


def tcp_client(server: RedisServer, timeout_s: float = 2.0, **address: Any) -> RespClient:
    return RespClient(RespAddress(host="127.0.0.1", port=server.port, **address), timeout_s=timeout_s)


# -- the parser --------------------------------------------------------------------

# A reply value: None (nil), int, bytes, an error (as text tagged "err"), or a nested list.
Reply = Any

replies = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.binary(max_size=40)
    | st.builds(lambda text: ("err", "ERR " + text), st.text("abcdef xyz", max_size=20))
    | st.builds(lambda text: ("simple", text), st.text("abcdefOK", max_size=10)),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


def to_wire(value: Reply) -> bytes:
    """The test's own RESP2 encoder (independent of the client's)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n" % len(value) + value + b"\r\n"
    if isinstance(value, tuple):
        kind, text = value
        return (b"-" if kind == "err" else b"+") + text.encode() + b"\r\n"
    return b"*%d\r\n" % len(value) + b"".join(to_wire(v) for v in value)


def expected(value: Reply) -> Reply:
    if isinstance(value, tuple):
        kind, text = value
        return ("ResponseError", text) if kind == "err" else text.encode()
    if isinstance(value, list):
        return [expected(v) for v in value]
    return value


def comparable(value: Any) -> Any:
    if isinstance(value, Exception):
        return (type(value).__name__, str(value))
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(replies, min_size=1, max_size=6), data=st.data())
def test_parser_gives_the_same_replies_however_the_bytes_are_split(values: list[Reply], data: st.DataObject) -> None:
    wire = b"".join(to_wire(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    parser = RespParser()
    got: list[Any] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        parser.feed(wire[start:cut])
        got.extend(parser.replies())
        start = cut
    assert comparable(got) == [expected(v) for v in values]
    # Nothing left over: the next reply starts clean.
    parser.feed(b":7\r\n")
    assert parser.replies() == [7]


def test_parser_one_byte_at_a_time_and_large_bulk() -> None:
    big = bytes(range(256)) * 1000 + b"\r\n$3\r\n"  # CRLF and headers inside the payload
    wire = to_wire([1, big, [b"x", None, []]]) + to_wire(b"tail")
    parser = RespParser()
    got: list[Any] = []
    for i in range(0, len(wire), 977):  # a large reply in many pieces
        parser.feed(wire[i : i + 977])
        got.extend(parser.replies())
    assert got == [[1, big, [b"x", None, []]], b"tail"]
    parser = RespParser()
    got = []
    for byte in to_wire([b"ab", -5, ("err", "NOSCRIPT No matching script")]):
        parser.feed(bytes([byte]))
        got.extend(parser.replies())
    assert len(got) == 1 and got[0][:2] == [b"ab", -5] and isinstance(got[0][2], NoScriptError)


def test_parser_rejects_an_unknown_reply_type() -> None:
    parser = RespParser()
    parser.feed(b"?what\r\n")
    with pytest.raises(InvalidResponse):
        parser.replies()


def test_encode_command() -> None:
    assert encode_command(("EVALSHA", b"ab", 1, 2.5, "\u00e9")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\n2.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    with pytest.raises(redis.DataError):
        encode_command(("SET", "k", None))


# -- against a real server ------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_pipelines_many_concurrent_calls_in_one_write(redis_server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = tcp_client(redis_server)
        try:
            assert await client.execute("PING") == b"PONG"
            writes = client.writes
            # 2,000 calls issued in one loop iteration: one write, each reply to its own caller.
            futures = [client.execute("ECHO", f"value-{i}") for i in range(2000)]
            futures.append(client.execute("INCRBY", "counter", 5))
            got = await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert got[:-1] == [f"value-{i}".encode() for i in range(2000)]
            assert got[-1] == 5
            assert client.writes == writes + 1
            assert client.connects == 1
            # Concurrent tasks issuing in many iterations still get their own replies.

            async def worker(n: int) -> None:
                for i in range(50):
                    assert await client.execute("ECHO", f"{n}:{i}") == f"{n}:{i}".encode()

            await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(40))), 10)
        finally:
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_error_replies(redis_server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = tcp_client(redis_server)
        try:
            await client.execute("SET", "text", "x")
            results = await asyncio.wait_for(
                asyncio.gather(
                    client.execute("INCR", "text"),
                    client.execute("NOSUCHCOMMAND"),
                    client.evalsha("0" * 40, 0),
                    client.execute("EVAL", "return {1, redis.error_reply('boom'), 'ok'}", 0),
                    client.execute("GET", "text"),
                    return_exceptions=True,
                ),
                5,
            )
            assert type(results[0]) is ResponseError and "not an integer" in str(results[0])
            assert type(results[1]) is ResponseError
            assert isinstance(results[2], NoScriptError)
            # An error inside an array is a value, as in redis-py, not a failed call.
            array = results[3]
            assert isinstance(array, list)
            assert array[0] == 1 and isinstance(array[1], ResponseError) and array[2] == b"ok"
            # Error replies do not disturb the matching of the replies after them.
            assert results[4] == b"x"
            assert client.connects == 1
        finally:
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_noscript_after_script_flush_reloads_once(redis_server: RedisServer, loop: str) -> None:
    async def main() -> None:
        limiter = RedisLimiter(connect(redis_server.url, timeout_ms=2000, max_connections=4), owns_client=True)
        try:
            rule = LimitRule(bucket="actor-flush", feature="chat_completions", limit=100, interval_s=3600.0)
            await limiter.load_scripts()
            assert (await limiter.acquire(rule)).allowed
            redis_server.script_flush()
            loads = limiter.stats.script_loads
            decisions = await asyncio.wait_for(asyncio.gather(*(limiter.acquire(rule) for _ in range(20))), 10)
            assert all(d.allowed for d in decisions)
            assert limiter.stats.noscript_replies == 20 and limiter.stats.script_loads == loads + 1
            assert (await limiter.status(rule)).remaining == 79
        finally:
            await limiter.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_timeout_fails_every_pending_call_and_closes_the_connection(
    redis_server_private: RedisServer, loop: str
) -> None:
    timeout_s = 0.3

    async def main() -> None:
        client = tcp_client(redis_server_private, timeout_s=timeout_s)
        try:
            assert await client.execute("PING") == b"PONG"
            redis_server_private.pause()
            started = time.monotonic()
            first = [client.execute("INCR", "n") for _ in range(10)]
            await asyncio.sleep(0.1)  # a second batch, sent later: it still fails with the first
            second = [client.execute("INCR", "n") for _ in range(10)]
            results = await asyncio.wait_for(asyncio.gather(*first, *second, return_exceptions=True), 5)
            elapsed = time.monotonic() - started
            assert all(type(r) is TimeoutError for r in results), results
            # One timeout, never a retry; the later batch does not wait a timeout of its own.
            assert timeout_s - 0.01 <= elapsed < timeout_s + 0.25
            # No reconnect attempt was made for the timed-out calls.
            assert client.connects == 1 and client.resent == 0
            redis_server_private.resume()
            assert await asyncio.wait_for(client.execute("PING"), 5) == b"PONG"
            assert client.connects == 2
        finally:
            redis_server_private.resume()
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_reconnects_after_a_redis_restart(redis_server_private: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = tcp_client(redis_server_private)
        try:
            assert await client.execute("SET", "k", "v") == b"OK"
            await asyncio.to_thread(redis_server_private.restart)  # same port, empty data
            assert await asyncio.wait_for(client.execute("GET", "k"), 5) is None
            assert client.connects == 2
            await asyncio.to_thread(redis_server_private.stop)
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(client.execute("PING"), 5)
            await asyncio.to_thread(redis_server_private.start)
            assert await asyncio.wait_for(client.execute("PING"), 5) == b"PONG"
        finally:
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_call_sent_on_a_connection_closed_under_it_is_sent_once_more(
    redis_server: RedisServer, loop: str
) -> None:
    async def main() -> None:
        client = tcp_client(redis_server)
        admin = redis_server.client()
        try:
            assert await client.execute("PING") == b"PONG"
            # The server drops the connection while this loop is not looking, and
            # the call is written before the loop sees the close: a stale connection.
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            assert await asyncio.wait_for(client.execute("INCR", "stale"), 5) == 1
            assert client.resent == 1 and client.connects == 2
            stale = admin.get("stale")
            assert stale is not None and int(stale) == 1
        finally:
            admin.close()
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelled_callers_do_not_break_matching(redis_server: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = tcp_client(redis_server)
        try:
            futures = [client.execute("ECHO", str(i)) for i in range(200)]
            for future in futures[::2]:
                future.cancel()
            tasks = [asyncio.ensure_future(client.execute("ECHO", f"t{i}")) for i in range(50)]
            await asyncio.sleep(0)
            for task in tasks[::3]:
                task.cancel()
            kept = await asyncio.wait_for(asyncio.gather(*futures[1::2]), 5)
            assert kept == [str(i).encode() for i in range(1, 200, 2)]
            survivors = [t for i, t in enumerate(tasks) if i % 3]
            assert await asyncio.wait_for(asyncio.gather(*survivors), 5) == [
                f"t{i}".encode() for i in range(50) if i % 3
            ]
            assert await client.execute("ECHO", "after") == b"after"
            # A limiter call abandoned by a timeout leaves the limiter usable.
            limiter = RedisLimiter(connect(redis_server.url, timeout_ms=2000, max_connections=4), owns_client=True)
            rule = LimitRule(bucket="actor-cancel", feature="chat_completions", limit=10, interval_s=3600.0)
            calls = [asyncio.ensure_future(limiter.acquire(rule)) for _ in range(5)]
            await asyncio.sleep(0)
            calls[0].cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert (await limiter.acquire(rule)).allowed
            await limiter.close()
        finally:
            await client.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_fails_pending_calls(redis_server_private: RedisServer, loop: str) -> None:
    async def main() -> None:
        client = tcp_client(redis_server_private, timeout_s=5.0)
        try:
            assert await client.execute("PING") == b"PONG"
            redis_server_private.pause()
            pending = [client.execute("PING") for _ in range(5)]
            await asyncio.sleep(0.05)  # written, waiting for replies
            started = time.monotonic()
            await client.close()
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 1)
            assert all(type(r) is ConnectionError for r in results)
            assert time.monotonic() - started < 0.5
            with pytest.raises(ConnectionError):
                await client.execute("PING")
        finally:
            redis_server_private.resume()

    run(loop, main)


def test_connection_refused_is_a_connection_error_failover_handles() -> None:
    port = free_port()  # nothing listens there

    async def main() -> None:
        limiter = RedisLimiter(connect(f"redis://127.0.0.1:{port}/0", timeout_ms=300, max_connections=4), owns_client=True)
        failover = FailoverLimiter(limiter, MemoryLimiter(), FAIL_CLOSED, 0.3)
        try:
            with pytest.raises(ConnectionError):
                await limiter.ping()
            rule = LimitRule(bucket="actor-down", feature="chat_completions", limit=10, interval_s=3600.0)
            started = time.monotonic()
            with pytest.raises(Exception) as err:
                await failover.acquire(rule)
            assert type(err.value).__name__ == "LimiterUnavailable"
            assert time.monotonic() - started < 0.3
            assert failover.stats.primary_errors == 1
        finally:
            await failover.close()

    asyncio.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_auth_with_username_and_db_selection(redis_server_private: RedisServer, loop: str) -> None:
    admin = redis_server_private.client()
    admin.acl_setuser("alice", enabled=True, passwords=["+s3cret"], keys=["*"], commands=["+@all"])
    port = redis_server_private.port

    async def main() -> None:
        limiter = RedisLimiter(
            connect(f"redis://alice:s3cret@127.0.0.1:{port}/5", timeout_ms=2000, max_connections=4), owns_client=True
        )
        rule = LimitRule(bucket="actor-auth", feature="chat_completions", limit=10, interval_s=3600.0, concurrency=2)
        try:
            await limiter.load_scripts()
            assert (await limiter.acquire(rule)).allowed
        finally:
            await limiter.close()
        wrong = lean_client(single_node(f"redis://alice:wrong@127.0.0.1:{port}/5", timeout_ms=2000, max_connections=4))
        try:
            # Every call pipelined behind the failed AUTH fails with the cause, not NOAUTH.
            results = await asyncio.gather(*(wrong.execute("PING") for _ in range(3)), return_exceptions=True)
            assert all(type(r) is AuthenticationError for r in results), results
            assert isinstance(results[0], RedisError)  # failover's net catches it
        finally:
            await wrong.close()
        # Password only (the default user), and a database out of range.
        admin.config_set("requirepass", "pw-only")
        password_only = lean_client(single_node(f"redis://:pw-only@127.0.0.1:{port}/3", timeout_ms=2000, max_connections=4))
        bad_db = lean_client(single_node(f"redis://:pw-only@127.0.0.1:{port}/99", timeout_ms=2000, max_connections=4))
        try:
            assert await password_only.execute("SET", "in-db-3", "yes") == b"OK"
            with pytest.raises(ResponseError):
                await bad_db.execute("PING")
        finally:
            await password_only.close()
            await bad_db.close()

    try:
        run(loop, main)
        alice = redis.Redis(host="127.0.0.1", port=port, username="alice", password="s3cret", db=5)
        with contextlib.closing(alice):
            assert any(b"actor-auth" in key for key in alice.keys("*"))
        default = redis.Redis(host="127.0.0.1", port=port, password="pw-only", db=3)
        with contextlib.closing(default):
            assert default.get("in-db-3") == b"yes"
    finally:
        admin.close()


@contextlib.contextmanager
def extra_server(*args: str) -> Iterator[RedisServer]:
    workdir = Path(tempfile.mkdtemp(prefix="resp-", dir="/tmp"))  # unix socket paths must stay short
    server = RedisServer(workdir, extra_args=args)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("loop", LOOPS)
def test_unix_socket(loop: str) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="sock-", dir="/tmp"))
    path = sock_dir / "redis.sock"
    with extra_server("--unixsocket", str(path), "--unixsocketperm", "700") as server:

        async def main() -> None:
            limiter = RedisLimiter(connect(f"unix://{path}?db=2", timeout_ms=2000, max_connections=4), owns_client=True)
            rule = LimitRule(bucket="actor-unix", feature="chat_completions", limit=10, interval_s=3600.0)
            try:
                decisions = await asyncio.gather(*(limiter.acquire(rule) for _ in range(12)))
                assert sum(d.allowed for d in decisions) == 10
            finally:
                await limiter.close()

        run(loop, main)
        db2 = redis.Redis(host="127.0.0.1", port=server.port, db=2)
        with contextlib.closing(db2):
            assert any(b"actor-unix" in key for key in db2.keys("*"))
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_tls_verifies_like_redis_py(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )
    tls_port = free_port()
    tls_args = ("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                "--tls-auth-clients", "no")
    try:
        context = extra_server(*tls_args)
        context.__enter__()
    except Exception as err:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS here: {err}")
    try:

        async def main() -> None:
            trusted = f"rediss://localhost:{tls_port}/0?ssl_ca_certs={cert}"
            limiter = RedisLimiter(connect(trusted, timeout_ms=2000, max_connections=4), owns_client=True)
            rule = LimitRule(bucket="actor-tls", feature="chat_completions", limit=10, interval_s=3600.0)
            try:
                assert (await limiter.acquire(rule)).allowed
            finally:
                await limiter.close()
            # Not trusted (no CA) or the wrong name: refused, by redis-py and by the lean client alike.
            for url in (f"rediss://localhost:{tls_port}/0", f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"):
                redis_py = single_node(url, timeout_ms=2000, max_connections=4)
                lean = lean_client(redis_py)
                try:
                    with pytest.raises(ConnectionError):
                        await redis_py.ping()
                    with pytest.raises(ConnectionError) as err:
                        await lean.execute("PING")
                    assert "certificate" in str(err.value).lower() or "CERTIFICATE" in str(err.value)
                finally:
                    await lean.close()
                    await redis_py.aclose()

        asyncio.run(main())
    finally:
        context.__exit__(None, None, None)


def test_address_repr_hides_the_password() -> None:
    client = lean_client(single_node("redis://user:hunter2@127.0.0.1:1/0", timeout_ms=100, max_connections=1))
    assert "hunter2" not in repr(client.address)
    assert client.timeout_s == 0.1


def test_failover_sees_a_paused_redis_as_a_timeout(redis_server_private: RedisServer) -> None:
    async def main() -> None:
        client = connect(redis_server_private.url, timeout_ms=200, max_connections=4)
        failover = FailoverLimiter(RedisLimiter(client, owns_client=True), MemoryLimiter(), FAIL_CLOSED, 0.2)
        rule = LimitRule(bucket="actor-paused", feature="chat_completions", limit=10, interval_s=3600.0)
        try:
            assert (await failover.acquire(rule)).allowed
            redis_server_private.pause()
            with pytest.raises(Exception):
                await failover.acquire(rule)
            assert failover.stats.primary_timeouts == 1
        finally:
            redis_server_private.resume()
            await failover.close()

    uvloop.run(main())
