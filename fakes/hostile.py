"""A hostile upstream for tests: it misbehaves on request, and records what the gateway did.

One raw HTTP/1.1 server (asyncio, in a thread of the test process, or as a
process: ``python -m fakes.hostile --port 0``). What it does is told by
``hostile:<name>=<value>`` directives anywhere in the request body, so one
server serves a whole test module:

* ``hostile:delay=S``      wait S seconds before the response head (a slow model)
* ``hostile:silent=S``     send the head and one event, then nothing for S seconds
* ``hostile:redirect=N``   answer status N (301/302/303/307/308) with a ``Location``
* ``hostile:gzip=1``       a 200 whose body is gzip, with ``Content-Encoding: gzip``
* ``hostile:junk=1``       a 200 event stream: one valid event, then bytes that are not SSE
* ``hostile:status=N``     answer status N with a JSON error
* ``hostile:id=X``         a name for the exchange, to find it in ``exchanges``

Otherwise it answers like the Anthropic Messages API (an event stream when
the body asks for ``"stream": true``, JSON otherwise). While it waits or is
silent it keeps reading the connection, so ``Seen.disconnected_at`` is when
the gateway closed it: how fast an abort reaches the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import re
import threading
import time
from dataclasses import dataclass, field

import orjson

_DIRECTIVE = re.compile(rb"hostile:(\w+)=([\w.\-]+)")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_MAX_HEAD = 64 * 1024


@dataclass
class Seen:
    """One request as the upstream saw it (times are ``time.monotonic()``)."""

    name: str
    path: str
    headers: dict[str, str]
    body: bytes
    directives: dict[str, str]
    received_at: float
    # When the peer closed the connection before the response was complete.
    disconnected_at: float | None = None
    finished_at: float | None = None
    events: list[str] = field(default_factory=list)


def _event(name: str, data: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


MESSAGE_START = _event(
    "message_start",
    {"type": "message_start", "message": {"id": "msg_hostile", "type": "message", "role": "assistant", "model": "claude-3-haiku-20240307",
                                          "content": [], "usage": {"input_tokens": 5, "output_tokens": 1}}},
)
STREAM_REST = (
    _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    + _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}})
    + _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    + _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}})
    + _event("message_stop", {"type": "message_stop"})
)
JSON_BODY = orjson.dumps(
    {"id": "msg_hostile", "type": "message", "role": "assistant", "model": "claude-3-haiku-20240307",
     "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 2}}
)
JUNK = b"<html><body>502 Bad Gateway</body></html>\n\x1f\x8b\x08\x00 binary \xff\xfe\n\n"


class HostileUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self.exchanges: list[Seen] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.base_url = ""

    # -- life -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> HostileUpstream:
        self._thread = threading.Thread(target=self._run, name="hostile-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("hostile upstream did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, self._host, self._port))
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://{self._host}:{port}"
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # -- what the tests read -----------------------------------------------------------

    def find(self, name: str) -> Seen | None:
        with self._cond:
            for seen in self.exchanges:
                if seen.name == name:
                    return seen
        return None

    def wait_for(self, name: str, what: str = "received", timeout: float = 10.0) -> Seen:
        """The exchange named ``name`` once it has ``what`` ("received", "disconnected" or "finished")."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seen in self.exchanges:
                    if seen.name == name and (
                        what == "received"
                        or (what == "disconnected" and seen.disconnected_at is not None)
                        or (what == "finished" and (seen.finished_at is not None or seen.disconnected_at is not None))
                    ):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"hostile upstream: no {what} exchange {name!r} within {timeout}s")
                self._cond.wait(min(remaining, 0.05))

    def count(self, name: str) -> int:
        with self._cond:
            return sum(1 for seen in self.exchanges if seen.name == name)

    def _note(self, seen: Seen, *, disconnected: bool = False, finished: bool = False) -> None:
        with self._cond:
            now = time.monotonic()
            if disconnected and seen.disconnected_at is None and seen.finished_at is None:
                seen.disconnected_at = now
            if finished and seen.finished_at is None:
                seen.finished_at = now
            self._cond.notify_all()

    # -- the server ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head[:_MAX_HEAD].decode("latin1").split("\r\n")
        parts = lines[0].split(" ")
        path = parts[1] if len(parts) > 1 else "/"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        try:
            body = await reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        directives = {k.decode(): v.decode() for k, v in _DIRECTIVE.findall(body)}
        seen = Seen(directives.get("id", ""), path, headers, body, directives, time.monotonic())
        with self._cond:
            self.exchanges.append(seen)
            self._cond.notify_all()
        try:
            await self._answer(seen, reader, writer)
        except (ConnectionError, OSError):
            self._note(seen, disconnected=True)
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _wait_or_eof(self, seen: Seen, reader: asyncio.StreamReader, seconds: float) -> bool:
        """Wait ``seconds`` while reading the connection; False (and noted) if the peer closed it."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return True
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self._note(seen, disconnected=True)
            return False
        return True

    async def _answer(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        d = seen.directives
        stream = bool(_STREAM.search(seen.body))
        if "delay" in d and not await self._wait_or_eof(seen, reader, float(d["delay"])):
            return
        if "redirect" in d:
            status = int(d["redirect"])
            body = b'{"error":"moved"}'
            writer.write(self._head(status, "application/json", len(body), extra={"Location": "http://attacker.invalid/v1/messages"}) + body)
        elif "status" in d:
            status = int(d["status"])
            body = orjson.dumps({"type": "error", "error": {"type": "hostile", "message": f"status {status}"}})
            writer.write(self._head(status, "application/json", len(body)) + body)
        elif "gzip" in d:
            body = gzip.compress((MESSAGE_START + STREAM_REST) if stream else JSON_BODY)
            content_type = "text/event-stream" if stream else "application/json"
            writer.write(self._head(200, content_type, len(body), extra={"Content-Encoding": "gzip"}) + body)
        elif stream:
            writer.write(self._head(200, "text/event-stream", None) + MESSAGE_START)
            await writer.drain()
            if "silent" in d and not await self._wait_or_eof(seen, reader, float(d["silent"])):
                return
            if "junk" in d:
                # The first event goes out on its own, so a relay has started before the junk.
                if not await self._wait_or_eof(seen, reader, 0.1):
                    return
                writer.write(JUNK)
                await writer.drain()
                if not await self._wait_or_eof(seen, reader, 0.2):
                    return
            writer.write(STREAM_REST)
        else:
            writer.write(self._head(200, "application/json", len(JSON_BODY)) + JSON_BODY)
        await writer.drain()
        self._note(seen, finished=True)

    @staticmethod
    def _head(status: int, content_type: str, length: int | None, extra: dict[str, str] | None = None) -> bytes:
        lines = [f"HTTP/1.1 {status} Hostile", f"Content-Type: {content_type}", "Connection: close"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    upstream = HostileUpstream(port=args.port).start()
    print(f"hostile upstream listening on {upstream.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        upstream.stop()


if __name__ == "__main__":
    main()
