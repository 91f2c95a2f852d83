"""A minimal RESP2 client for the limiter's hot path (single Redis node only).

redis-py spends ~0.1-0.2 ms of CPU per command on a pool checkout, a retry
wrapper, an ``asyncio.timeout``, a stream writer and a RESP3-capable parser.
The limiter sends two small EVALSHAs per request and needs none of that
generality, so this client keeps:

* ONE persistent connection (Redis runs commands one at a time anyway, so more
  connections buy nothing but round-trip overlap that pipelining gives for free);
* every command issued during one loop iteration written with one
  ``transport.write``; replies matched to callers in FIFO order;
* one loop timer per connection watching the oldest pending deadline, instead
  of a timeout per call; a connection that times out is closed, because the
  replies still owed on it could no longer be matched;
* redis-py's exception classes, so ``limiter/failover.py`` handles failures
  exactly as before: ``ConnectionError`` (connect/IO failure, closed),
  ``TimeoutError`` (redis.exceptions), ``NoScriptError``, ``ResponseError``,
  ``AuthenticationError``.

Redis Cluster is not spoken here: cluster endpoints stay on redis-py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    DataError,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
)

# Error replies whose first word names a more precise redis-py exception.
_ERROR_CLASSES: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "NOPERM": NoPermissionError,
    "OOM": OutOfMemoryError,
}

# A timer that fires a hair before the deadline (clock granularity) counts as
# on time, so it is not re-armed for a few microseconds over and over.
_DEADLINE_SLACK_S = 0.001

# Consumed bytes are cut from the front of the read buffer only past this size
# (or when everything was consumed): a large reply arriving in many pieces is
# then not moved again for every piece.
_COMPACT_AT = 1 << 16


def error_reply(message: str) -> RedisError:
    """The redis-py exception for an error reply's text."""
    return _ERROR_CLASSES.get(message.split(" ", 1)[0], ResponseError)(message)


class RespParser:
    """Incremental RESP2 reply parser.

    Feed it bytes as they arrive, in any split; ``replies()`` returns every
    complete top-level reply so far. Error replies are returned (not raised)
    as redis-py exception instances, also inside arrays, as redis-py does.
    An array left incomplete keeps its parsed elements on a stack, so a large
    reply arriving in pieces is not parsed again from its start.
    """

    __slots__ = ("_buf", "_pos", "_stack")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        # Arrays being filled: (elements so far, expected length).
        self._stack: list[tuple[list[Any], int]] = []

    def feed(self, data: bytes) -> None:
        self._buf += data

    def replies(self) -> list[Any]:
        buf = self._buf
        pos = self._pos
        stack = self._stack
        out: list[Any] = []
        size = len(buf)
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            kind = buf[pos]
            value: Any
            if kind == 0x24:  # $ bulk string
                length = int(buf[pos + 1 : end])
                if length < 0:
                    value = None
                    pos = end + 2
                else:
                    stop = end + 2 + length
                    if stop + 2 > size:
                        break
                    value = bytes(buf[end + 2 : stop])
                    pos = stop + 2
            elif kind == 0x3A:  # : integer
                value = int(buf[pos + 1 : end])
                pos = end + 2
            elif kind == 0x2A:  # * array
                length = int(buf[pos + 1 : end])
                pos = end + 2
                if length > 0:
                    stack.append(([], length))
                    continue
                value = None if length < 0 else []
            elif kind == 0x2B:  # + simple string
                value = bytes(buf[pos + 1 : end])
                pos = end + 2
            elif kind == 0x2D:  # - error
                value = error_reply(buf[pos + 1 : end].decode("utf-8", "replace"))
                pos = end + 2
            else:
                raise InvalidResponse(f"protocol error: unexpected reply type byte {kind!r}")
            # Hand the finished value to the innermost open array; an array
            # that is now full is itself a finished value one level up.
            while stack:
                elements, expected = stack[-1]
                elements.append(value)
                if len(elements) < expected:
                    break
                stack.pop()
                value = elements
            else:
                out.append(value)
        if pos >= size:
            buf.clear()
            pos = 0
        elif pos >= _COMPACT_AT:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out


def _arg_bytes(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int) and not isinstance(arg, bool):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    # redis-py refuses these too: str(None) or str(True) would store a surprise.
    raise DataError(f"invalid Redis command argument of type {type(arg).__name__}")


def encode_command(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        # The limiter's arguments are str and int: those two first, without the checks.
        kind = type(arg)
        if kind is str:
            data = arg.encode()
        elif kind is int:
            data = b"%d" % arg
        else:
            data = _arg_bytes(arg)
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class RespAddress:
    """Where and how to connect: a TCP host and port (optionally TLS) or a unix socket path."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    ssl_context: ssl.SSLContext | None = None

    def handshake(self) -> tuple[bytes, tuple[type[RedisError], ...]]:
        """The commands sent first on every connection, and the error class each one's failure means."""
        commands: list[bytes] = []
        errors: list[type[RedisError]] = []
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            commands.append(encode_command(auth))
            errors.append(AuthenticationError)
        if self.db:
            commands.append(encode_command(("SELECT", self.db)))
            errors.append(ResponseError)
        return b"".join(commands), tuple(errors)


# A call in flight: its future, the encoded command (kept to send it again
# after a stale connection), its deadline on the loop clock, and whether it
# was already sent again once.
_Call = tuple[asyncio.Future[Any], bytes, float, bool]


class _Connection(asyncio.Protocol):
    """One socket to Redis: writes batches, matches replies FIFO, watches deadlines."""

    def __init__(self, client: RespClient, handshake_errors: tuple[type[RedisError], ...]) -> None:
        self._client = client
        self._loop = client.loop
        self._parser = RespParser()
        self._pending: deque[_Call] = deque()
        # Replies owed to the handshake (AUTH, SELECT) come before any call's.
        self._handshake: deque[type[RedisError]] = deque(handshake_errors)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """Take the transport (uvloop may call connection_made only after create_connection returned)."""
        if self._transport is transport:
            return
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small request/reply traffic: never hold a write back for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            replies = parser.replies()
        except (InvalidResponse, ValueError) as exc:
            self.fail(exc if isinstance(exc, InvalidResponse) else InvalidResponse(f"protocol error: {exc}"))
            return
        pending = self._pending
        for reply in replies:
            if self._handshake:
                error_class = self._handshake.popleft()
                if isinstance(reply, Exception):
                    # The commands pipelined behind a failed AUTH would only
                    # answer NOAUTH: fail them all with the cause.
                    self.fail(error_class(str(reply)))
                    return
                continue
            if not pending:
                self.fail(InvalidResponse("protocol error: a reply nobody asked for"))
                return
            future = pending.popleft()[0]
            if future.done():
                continue  # its caller gave up (cancelled); the reply is still consumed in order
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        self._client._lost(self, self._take_pending(), exc)

    # -- used by RespClient ----------------------------------------------------

    def send(self, data: bytes, calls: list[_Call]) -> None:
        """Write ``data`` for ``calls``; on a transport that closed meanwhile, hand them to the client
        as calls whose connection was lost (sent once more, then failed): never write to it
        (uvloop raises RuntimeError on a closed transport; asyncio would drop the bytes)."""
        transport = self._transport
        if self.closed or transport is None:
            self._client._lost(self, calls, None)
            return
        self._pending.extend(calls)
        if transport.is_closing():
            transport.abort()
            self.connection_lost(None)
            return
        try:
            transport.write(data)
        except (RuntimeError, OSError) as exc:
            transport.abort()
            self.connection_lost(exc)
            return
        if self._timer is None and self._pending:
            self._timer = self._loop.call_at(self._pending[0][2], self._check_deadline)

    def fail(self, exc: RedisError) -> None:
        """Close now and fail every call still owed a reply with ``exc``; nothing is sent again."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()
        calls = self._take_pending()
        self._client._forget(self)
        for future, *_ in calls:
            if not future.done():
                future.set_exception(exc)

    # -- internals ---------------------------------------------------------------

    def _take_pending(self) -> list[_Call]:
        calls = list(self._pending)
        self._pending.clear()
        return calls

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_deadline(self) -> None:
        self._timer = None
        if self.closed or not self._pending:
            return
        deadline = self._pending[0][2]
        if deadline <= self._loop.time() + _DEADLINE_SLACK_S:
            self.fail(TimeoutError("Timeout reading from Redis"))
            return
        self._timer = self._loop.call_at(deadline, self._check_deadline)


def _retrieve(task: asyncio.Task[None]) -> None:
    """A connect task's error is handled inside it; never let one go unretrieved."""
    if not task.cancelled():
        task.exception()


class RespClient:
    """Commands to one Redis node over one lazily opened, pipelined connection.

    ``execute`` returns a future; the command is written with every other
    command issued in the same loop iteration. Each call fails after
    ``timeout_s`` with redis.exceptions.TimeoutError (the connection is then
    closed). A call whose connection closed under it (a stale connection after
    a Redis restart) is sent once more on a new connection, as redis-py's
    one retry on ConnectionError did; a timed-out call never is.
    A client belongs to the event loop it was first used on.
    """

    def __init__(self, address: RespAddress, *, timeout_s: float, connect_timeout_s: float | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._handshake, self._handshake_errors = address.handshake()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queued: list[_Call] = []
        self._queued_data: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self.connects = 0  # connections opened
        self.writes = 0  # transport writes: one per loop iteration with commands, whatever their number
        self.resent = 0  # calls sent again because their connection closed under them

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; the future gets its reply (or a redis-py exception)."""
        return self._enqueue(encode_command(args))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> asyncio.Future[Any]:
        # The future itself, not a coroutine around it: this is the hot path.
        return self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> str:
        sha: bytes = await self.execute("SCRIPT", "LOAD", source)
        return sha.decode()

    async def delete(self, *keys: str) -> int:
        deleted: int = await self.execute("DEL", *keys)
        return deleted

    async def ping(self) -> bool:
        await self.execute("PING")
        return True

    async def close(self) -> None:
        """Fail every call not answered yet and close the connection."""
        self._closed = True
        closed = ConnectionError("Redis client closed")
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        self._fail_queued(closed)
        if self._conn is not None:
            self._conn.fail(closed)

    # -- internals ---------------------------------------------------------------

    def _enqueue(self, data: bytes) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._closed:
            future.set_exception(ConnectionError("Redis client closed"))
            return future
        self._queued.append((future, data, loop.time() + self.timeout_s, False))
        self._queued_data.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queued:
            return
        conn = self._conn
        if conn is not None and not conn.closed:
            calls, self._queued = self._queued, []
            data = b"".join(self._queued_data)
            self._queued_data = []
            self.writes += 1
            conn.send(data, calls)
        elif self._connecting is None:
            self._connecting = self.loop.create_task(self._connect())
            self._connecting.add_done_callback(_retrieve)

    async def _connect(self) -> None:
        address = self.address
        loop = self.loop
        handshake_errors = self._handshake_errors

        def protocol() -> _Connection:
            return _Connection(self, handshake_errors)

        try:
            if address.path is not None:
                connecting = loop.create_unix_connection(protocol, address.path)
            else:
                connecting = loop.create_connection(
                    protocol,
                    address.host,
                    address.port,
                    ssl=address.ssl_context,
                    server_hostname=address.host if address.ssl_context is not None else None,
                )
            transport, conn = await asyncio.wait_for(connecting, self.connect_timeout_s)
            conn.attach(transport)
        except Exception as exc:
            # Whatever went wrong, the queued calls must hear of it: nothing
            # else would ever complete them.
            self._connecting = None
            error: RedisError
            if isinstance(exc, asyncio.TimeoutError):
                error = TimeoutError("Timeout connecting to Redis")
            else:
                error = ConnectionError(f"Error connecting to Redis: {exc}")
            self._fail_queued(error)
            return
        self._connecting = None
        if self._closed:
            conn.fail(ConnectionError("Redis client closed"))
            return
        # Commands queued while connecting go out with the handshake, in one write.
        calls, self._queued = self._queued, []
        data = b"".join([self._handshake, *self._queued_data])
        self._queued_data = []
        if conn.closed or transport.is_closing():
            # The server closed the connection before its first use (accepted, then reset):
            # the queued calls never left; treat them as lost with it (sent once more).
            conn.fail(ConnectionError("Connection closed by Redis while connecting"))
            self._lost(conn, calls, None)
            return
        self.connects += 1
        self._conn = conn
        self.writes += 1
        conn.send(data, calls)

    def _fail_queued(self, error: RedisError) -> None:
        queued, self._queued, self._queued_data = self._queued, [], []
        for future, *_ in queued:
            if not future.done():
                future.set_exception(error)

    def _forget(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    def _lost(self, conn: _Connection, calls: list[_Call], exc: Exception | None) -> None:
        """The server closed ``conn`` (or the socket failed): send each call once more, or fail it."""
        self._forget(conn)
        error = ConnectionError(f"Connection to Redis lost: {exc}" if exc else "Connection closed by Redis")
        again: list[_Call] = []
        for future, data, deadline, resent in calls:
            if future.done():
                continue
            if resent or self._closed:
                future.set_exception(error)
            else:
                again.append((future, data, deadline, True))
        if not again:
            return
        self.resent += len(again)
        # Ahead of anything issued since: they were sent first, and keeping
        # deadlines in order lets the connection's timer watch only the oldest.
        self._queued[:0] = again
        self._queued_data[:0] = [data for _, data, _, _ in again]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
