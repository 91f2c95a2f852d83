"""One upstream attempt over the shared curl AsyncHTTPClient.

curl gives no cancel and no async backpressure. So: the body arrives through
``streaming_callback`` (a plain function) straight into the caller's sink;
headers through ``header_callback``; and a transfer is aborted by an
``XFERINFOFUNCTION`` that returns non-zero once the caller sets ``abort``.
Failures are classified into outcomes the pipeline maps to statuses:
connect error, stall (curl low-speed), timeout, reset, client gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pycurl
from tornado.curl_httpclient import CurlError
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httputil import HTTPHeaders
from tornado.ioloop import PeriodicCallback

from conf.model import UpstreamConfig
from upstreams.base import UpstreamRequest

OK = "ok"
CLIENT_GONE = "client_gone"
CONNECT_ERROR = "connect_error"
TIMEOUT = "timeout"
STALL = "stall"
RESET = "reset"
ERROR = "error"
# The gateway refused what the upstream sent (wrong content type, broken wire format).
REJECTED = "rejected"

_CONNECT_ERRNOS = frozenset({pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY, pycurl.E_SSL_CONNECT_ERROR})
_RESET_ERRNOS = frozenset({pycurl.E_GOT_NOTHING, pycurl.E_RECV_ERROR, pycurl.E_PARTIAL_FILE, pycurl.E_SEND_ERROR})


@dataclass(slots=True)
class Attempt:
    """What one upstream attempt produced."""

    outcome: str = OK
    status: int | None = None
    headers: HTTPHeaders | None = None
    message: str = ""
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    ended_at: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended_at or time.monotonic()) - self.started_at


class AbortFlag:
    """Set when the client left; ``reject`` aborts because of what the upstream sent."""

    __slots__ = ("set_", "rejected")

    def __init__(self) -> None:
        self.set_ = False
        self.rejected: str | None = None

    def set(self) -> None:
        self.set_ = True

    def reject(self, reason: str) -> None:
        if self.rejected is None:
            self.rejected = reason

    def progress(self, *_: Any) -> int:
        """curl XFERINFOFUNCTION: non-zero aborts the transfer."""
        return 1 if self.set_ else 0


class Transport:
    """Upstream attempts, plus one sweep a second that aborts stalled streams.

    curl's own low-speed check averages over several seconds and ignores the
    wait for headers, so a stream that goes silent is detected here instead:
    after its first byte, an attempt silent for ``stall_timeout_s`` is aborted
    (within a second of the limit). Before the first byte the wait is the
    model's time to first token, bounded by X-Timeout-Ms instead.
    """

    def __init__(self, client: AsyncHTTPClient, config: UpstreamConfig) -> None:
        self._client = client
        self._config = config
        self._live: set[_Exchange] = set()
        self._sweeper: PeriodicCallback | None = None

    def _sweep(self) -> None:
        deadline = time.monotonic() - self._config.stall_timeout_s
        for exchange in self._live:
            if exchange.last_data_at is not None and exchange.last_data_at < deadline:
                exchange.stalled = True

    async def send(
        self,
        request: UpstreamRequest,
        *,
        timeout_s: float,
        abort: AbortFlag,
        on_headers: Callable[[int, HTTPHeaders], None],
        on_chunk: Callable[[bytes], None],
    ) -> Attempt:
        exchange = _Exchange(abort, on_headers, on_chunk, self._config.stall_timeout_s)
        attempt = exchange.attempt
        if self._sweeper is None:
            self._sweeper = PeriodicCallback(self._sweep, 1000)
            self._sweeper.start()
        http_request = HTTPRequest(
            request.url,
            method="POST",
            # Tornado copies these into its own HTTPHeaders; no copy needed here.
            headers=request.headers,  # type: ignore[arg-type]
            body=request.body,
            connect_timeout=self._config.connect_timeout_s,
            request_timeout=timeout_s,
            streaming_callback=exchange.chunk,
            prepare_curl_callback=exchange.prepare,
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
        )
        error: Exception | None
        self._live.add(exchange)
        try:
            response = await self._client.fetch(http_request, raise_error=False)
        except CurlError as exc:
            # Since Tornado 6, raise_error=False only covers HTTP statuses;
            # transport failures still raise.
            response, error = None, exc
        else:
            error = response.error
        finally:
            self._live.discard(exchange)
        attempt.ended_at = time.monotonic()
        exchange.dispatch_headers()
        if abort.rejected is not None and not abort.set_:
            # Refused by the gateway, whether or not curl finished the transfer first.
            attempt.outcome = REJECTED
            attempt.message = abort.rejected
            return attempt
        if response is not None and (error is None or not isinstance(error, CurlError)):
            if attempt.status is None:
                attempt.status = response.code
                attempt.headers = HTTPHeaders()
                on_headers(response.code, attempt.headers)
            return attempt
        if exchange.stalled:
            attempt.outcome = STALL
        elif abort.set_:
            attempt.outcome = CLIENT_GONE
        elif isinstance(error, CurlError):
            attempt.outcome = _classify(error, attempt)
        else:
            attempt.outcome = ERROR
        attempt.message = str(error)
        return attempt


class _Exchange:
    """One live attempt: curl's callbacks, the response head as parsed, and what the stall sweep sees.

    One slotted object with bound methods instead of closures and helper
    objects per attempt: thousands of streams stay open at once, and each
    closure cell and instance dict was memory held for a stream's whole life.
    """

    __slots__ = (
        "_on_chunk", "_on_headers", "_stall_s", "abort", "attempt", "complete", "headers",
        "last_data_at", "stalled", "status",
    )

    def __init__(
        self,
        abort: AbortFlag,
        on_headers: Callable[[int, HTTPHeaders], None],
        on_chunk: Callable[[bytes], None],
        stall_s: float,
    ) -> None:
        self.abort = abort
        self.attempt = Attempt()
        self._on_headers = on_headers
        self._on_chunk = on_chunk
        self._stall_s = stall_s
        self.last_data_at: float | None = None
        self.stalled = False
        # The final response's status line and headers (1xx blocks are skipped).
        self.status = 0
        self.headers: HTTPHeaders | None = None
        self.complete = False

    def prepare(self, curl: pycurl.Curl) -> None:
        # libcurl keeps a 64 KB upload buffer per handle by default; request
        # bodies are small, and with thousands of open streams it was 40% of
        # the memory per stream. 16 KB is the least libcurl accepts.
        curl.setopt(pycurl.UPLOAD_BUFFERSIZE, 16384)
        curl.setopt(pycurl.HEADERFUNCTION, self.header_line)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self.progress)
        # A backstop only: the sweep is the precise stall detector.
        curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        curl.setopt(pycurl.LOW_SPEED_TIME, self._stall_s * 2)

    def progress(self, *_: Any) -> int:
        """curl XFERINFOFUNCTION: non-zero aborts the transfer."""
        abort = self.abort
        return 1 if abort.set_ or abort.rejected is not None or self.stalled else 0

    def header_line(self, raw: bytes) -> None:
        """curl HEADERFUNCTION: pure data, no application code (it runs inside curl)."""
        line = raw.decode("latin1").rstrip("\r\n")
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = HTTPHeaders()
            self.complete = False
        elif line:
            if self.headers is None:
                self.headers = HTTPHeaders()
            try:
                self.headers.parse_line(line)
            except Exception:  # a garbled upstream header line is dropped, not fatal
                pass
        elif self.status >= 200:
            self.complete = True
            # The headers count as data for the stall sweep.
            self.last_data_at = time.monotonic()

    def dispatch_headers(self) -> None:
        # Runs on the IOLoop. curl can deliver a small response's body before
        # Tornado's queued header callbacks run, so headers are parsed
        # synchronously inside curl and handed over here, always before the
        # first chunk.
        attempt = self.attempt
        if self.complete and attempt.status is None:
            attempt.status = self.status
            attempt.headers = self.headers if self.headers is not None else HTTPHeaders()
            attempt.first_byte_at = time.monotonic()
            self._on_headers(self.status, attempt.headers)

    def chunk(self, data: bytes) -> None:
        """Tornado's streaming_callback, on the IOLoop."""
        self.last_data_at = time.monotonic()
        if self.attempt.status is None:
            self.dispatch_headers()
        self._on_chunk(data)


def _classify(error: CurlError, attempt: Attempt) -> str:
    errno = error.errno
    if errno == pycurl.E_OPERATION_TIMEDOUT:
        text = str(error).lower()
        if "too slow" in text:
            return STALL
        if attempt.status is None and "connect" in text:
            return CONNECT_ERROR
        return TIMEOUT
    if errno in _CONNECT_ERRNOS:
        return CONNECT_ERROR
    if errno in _RESET_ERRNOS:
        return RESET
    if errno == pycurl.E_ABORTED_BY_CALLBACK:
        return CLIENT_GONE
    return ERROR
