"""The load generator's engine: raw HTTP/1.1 over asyncio protocols.

Why not aiohttp or httpx: on two cores the load generator competes with the
gateway and the fake provider for CPU, so every microsecond it spends per
request or per chunk is taken from what it measures. This client sends one
prebuilt request (bytes, the same every time), parses only the status line
and framing headers, de-chunks with bytes.find, and counts SSE events with
bytes.count; it allocates nothing per event unless a paced scenario asks
for per-event arrival times.

Timings are ``time.perf_counter()`` seconds:
- TTFB: request written -> first response byte;
- latency: scheduled start -> last body byte (an open-loop request that had
  to wait for a free connection counts its wait: no coordinated omission);
- lateness (paced streams only): for content event i arriving at t_i,
  ``t_i - i / rate`` minus that stream's smallest such value, i.e. how late
  each event is against the provider's own schedule, anchored on the
  stream's most punctual event.
"""

from __future__ import annotations

import array
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_HEAD_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_EVENT_END = b"\n\n"
_ERROR_EVENT = b"event: error"


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    request: bytes  # the whole request, sent as is every time
    stream: bool
    token_marker: bytes = b""  # substring that starts each content event
    pace_per_s: float = 0.0  # > 0: record per-event lateness against this rate


def build_request(url: str, *, method: str = "POST", headers: dict[str, str], body: bytes) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Stats:
    """Everything one run measured; merged into the report at the end."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ttfb: array.array = field(default_factory=lambda: array.array("d"))
    latency: array.array = field(default_factory=lambda: array.array("d"))
    lateness: array.array = field(default_factory=lambda: array.array("d"))
    events: int = 0
    tokens: int = 0
    body_bytes: int = 0
    started: int = 0
    open_now: int = 0
    open_peak: int = 0
    connects: int = 0
    # Requests re-sent because a reused keep-alive connection turned out to be
    # closed by the server before any byte of the response (as curl does).
    stale_retries: int = 0

    def begin(self) -> None:
        self.started += 1
        self.open_now += 1
        self.open_peak = max(self.open_peak, self.open_now)

    def end(self) -> None:
        self.open_now -= 1


class ResponseError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Connection(asyncio.Protocol):
    """One keep-alive connection running one request at a time."""

    def __init__(self, target: Target, stats: Stats, record: bool) -> None:
        self.target = target
        self.stats = stats
        self.record = record  # False while warming up or after the window
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.served = 0
        self._waiter: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._head = bytearray()
        self._in_head = True
        self._status = 0
        self._chunked = False
        self._remaining = -1  # Content-Length left, or -1 when reading until close
        self._keep_alive = True
        self._chunk_left = 0
        self._skip = 0
        self._line = b""
        self._final = False
        self._t_sent = 0.0
        self._t_first = 0.0
        self._ev_tail = b""
        self._mk_tail = b""
        self._er_tail = b""
        self._tokens = 0
        self._in_band_error = False
        self._pace: array.array | None = None

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._remaining == -1 and not self._chunked and not self._in_head:
                # A body delimited by the connection closing is complete now.
                self._complete()
            elif self.served and not self._t_first:
                waiter.set_exception(ResponseError("stale"))
            else:
                waiter.set_exception(ResponseError("reset"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._waiter is None:
            return  # unsolicited bytes between requests: ignore
        if self._in_head:
            if not self._t_first:
                self._t_first = now
            self._head += data
            end = self._head.find(_HEAD_END)
            if end < 0:
                return
            head = bytes(self._head[:end])
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._in_head = False
            self._parse_head(head)
            if self._final:
                self._complete()
                return
        if self._chunked:
            self._dechunk(data, now)
        else:
            if self._remaining >= 0:
                data = data[: self._remaining]
                self._remaining -= len(data)
            self._payload(data, now)
            if self._remaining == 0:
                self._complete()

    # -- parsing -------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        try:
            self._status = int(head[9:12])
        except ValueError:
            self._status = 0
        lower = head.lower()
        self._chunked = b"\r\ntransfer-encoding: chunked" in lower
        self._keep_alive = b"\r\nconnection: close" not in lower
        if not self._chunked:
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.find(_CRLF, at + 17)
                self._remaining = int(lower[at + 17 : end if end >= 0 else len(lower)])
                if self._remaining == 0:
                    self._final = True
            else:
                self._remaining = -1
                self._keep_alive = False

    def _dechunk(self, data: bytes, now: float) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            if self._chunk_left:
                take = min(self._chunk_left, n - pos)
                self._payload(data[pos : pos + take], now)
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._skip = 2
                continue
            if self._skip:
                step = min(self._skip, n - pos)
                pos += step
                self._skip -= step
                if not self._skip and self._final:
                    self._complete()
                    return
                continue
            if self._line.endswith(b"\r") and data[pos : pos + 1] == b"\n":
                line, pos = self._line[:-1], pos + 1
            else:
                end = data.find(_CRLF, pos)
                if end < 0:
                    self._line += data[pos:]
                    return
                line, pos = self._line + data[pos:end], end + 2
            self._line = b""
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                # No trailers are ever sent here: the last chunk ends with one CRLF.
                self._final = True
                self._skip = 2
            else:
                self._chunk_left = size

    def _payload(self, data: bytes, now: float) -> None:
        if not data:
            return
        stats = self.stats if self.record else None
        if stats is not None:
            stats.body_bytes += len(data)
        if not self.target.stream:
            return
        events = (self._ev_tail + data).count(_EVENT_END)
        self._ev_tail = data[-1:]
        window = self._er_tail + data
        if _ERROR_EVENT in window:
            self._in_band_error = True
        self._er_tail = window[-(len(_ERROR_EVENT) - 1) :]
        marker = self.target.token_marker
        found = 0
        if marker:
            window = self._mk_tail + data
            found = window.count(marker)
            # Keep what could begin a marker split across packets; the tail is
            # shorter than the marker, so no occurrence is counted twice.
            self._mk_tail = window[-(len(marker) - 1) :]
            if found and self._pace is not None:
                rate = self.target.pace_per_s
                first = self._tokens
                for i in range(first, first + found):
                    self._pace.append(now - i / rate)
            self._tokens += found
        if stats is not None:
            stats.events += events
            stats.tokens += found

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- one request ---------------------------------------------------------------

    async def request(self, scheduled: float, timeout_s: float) -> None:
        """Sends the request and waits for the whole response; raises ResponseError."""
        assert self.transport is not None
        self._reset()
        if self.target.pace_per_s > 0 and self.target.token_marker:
            self._pace = array.array("d")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._t_sent = time.perf_counter()
        self.transport.write(self.target.request)
        stats = self.stats
        stats.begin()
        timer = loop.call_later(timeout_s, self._time_out)
        try:
            await waiter
        finally:
            timer.cancel()
            stats.end()
            self._waiter = None
        end = time.perf_counter()
        self.served += 1
        if not self._keep_alive:
            self.close()
        if not self.record:
            return
        if not 200 <= self._status < 300:
            stats.errors[f"http_{self._status}"] += 1
            return
        if self._in_band_error:
            stats.errors["in_band_error"] += 1
            return
        stats.ok += 1
        stats.ttfb.append(self._t_first - self._t_sent)
        stats.latency.append(end - scheduled)
        pace = self._pace
        if pace:
            anchor = min(pace)
            stats.lateness.extend(v - anchor for v in pace)

    def _time_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ResponseError("timeout"))
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def connect(target: Target, stats: Stats, record: bool, timeout_s: float = 10.0) -> Connection:
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(target, stats, record), target.host, target.port), timeout_s
        )
    except TimeoutError:
        raise ResponseError("connect_timeout") from None
    except OSError:
        raise ResponseError("connect") from None
    stats.connects += 1
    return conn


def percentiles(values: array.array | list[float], points: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p:g}": None for p in points}
    ordered = sorted(values)
    n = len(ordered)
    out: dict[str, float | None] = {}
    for p in points:
        # Nearest rank: the smallest value with at least p% of values at or below it.
        rank = max(1, min(n, int(-(-p * n // 100))))
        out[f"p{p:g}"] = ordered[rank - 1]
    return out


def summary(values: Any) -> dict[str, float | None]:
    out = percentiles(values)
    out["mean"] = (sum(values) / len(values)) if values else None
    out["max"] = max(values) if values else None
    return out
