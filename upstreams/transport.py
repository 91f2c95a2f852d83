"""One upstream attempt over the shared curl AsyncHTTPClient.

curl gives no cancel and no async backpressure. So: the body arrives through
``streaming_callback`` (a plain function) straight into the caller's sink;
headers through ``header_callback``. A transfer is ended early -- the client
left (``AbortFlag.set``), the gateway refused what the upstream sent
(``AbortFlag.reject``), the stream stalled, or the deadline passed -- by
taking its curl handle out of Tornado's multi handle at once (``_cancel``),
not at curl's next progress tick (up to a second while the upstream is
silent). An ``XFERINFOFUNCTION`` that returns non-zero stays as a fallback.

Every deadline holds whatever the caller asks for: curl is never handed a
0 ms timeout (which it reads as "none"), and an IOLoop timer ends the
attempt at its deadline even if curl does not (or has not started it yet).

What the upstream answers is checked before any of it reaches the caller:
a redirect (3xx) or a compressed 2xx body (``Content-Encoding`` other than
identity) ends the attempt as ``REJECTED``. Every request asks for identity
encoding.

Failures are classified into outcomes the pipeline maps to statuses:
connect error, stall, timeout, reset, client gone, rejected.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pycurl
from tornado.curl_httpclient import CurlError
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPInputError
from tornado.ioloop import IOLoop, PeriodicCallback

from conf.model import UpstreamConfig
from upstreams.base import UpstreamRequest


class Outcome(StrEnum):
    """How one upstream attempt ended.

    A ``StrEnum``: each member is the string it always was (``Outcome.OK ==
    "ok"``, and ``str``/``format``/JSON give ``"ok"``), so logs, metric labels
    and events are unchanged.
    """

    OK = "ok"
    CLIENT_GONE = "client_gone"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    STALL = "stall"
    RESET = "reset"
    ERROR = "error"
    # The gateway refused what the upstream sent (wrong content type, broken
    # wire format, a redirect, a compressed body).
    REJECTED = "rejected"


# The names callers have always used.
OK = Outcome.OK
CLIENT_GONE = Outcome.CLIENT_GONE
CONNECT_ERROR = Outcome.CONNECT_ERROR
TIMEOUT = Outcome.TIMEOUT
STALL = Outcome.STALL
RESET = Outcome.RESET
ERROR = Outcome.ERROR
REJECTED = Outcome.REJECTED

_CONNECT_ERRNOS = frozenset({pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_COULDNT_RESOLVE_PROXY, pycurl.E_SSL_CONNECT_ERROR})
_RESET_ERRNOS = frozenset({pycurl.E_GOT_NOTHING, pycurl.E_RECV_ERROR, pycurl.E_PARTIAL_FILE, pycurl.E_SEND_ERROR})
# A Content-Encoding that leaves the bytes as they are.
_IDENTITY = frozenset({"", "identity"})


@dataclass(slots=True)
class Attempt:
    """What one upstream attempt produced."""

    outcome: Outcome = OK
    status: int | None = None
    # The response head of a non-2xx answer (a 2xx head only goes to ``on_headers``).
    headers: HTTPHeaders | None = None
    message: str = ""
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    ended_at: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended_at or time.monotonic()) - self.started_at


class AbortFlag:
    """Set when the client left; ``reject`` aborts because of what the upstream sent.

    While an attempt runs, the transport listens: setting the flag (or
    rejecting) ends the transfer within one IOLoop iteration.
    """

    __slots__ = ("_listener", "rejected", "set_")

    def __init__(self) -> None:
        self.set_ = False
        self.rejected: str | None = None
        self._listener: Callable[[], None] | None = None

    def set(self) -> None:
        if not self.set_:
            self.set_ = True
            self._notify()

    def reject(self, reason: str) -> None:
        if self.rejected is None:
            self.rejected = reason
            self._notify()

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()

    def progress(self, *_: Any) -> int:
        """curl XFERINFOFUNCTION: non-zero aborts the transfer."""
        return 1 if self.set_ else 0


class Transport:
    """Upstream attempts, plus one sweep a second that ends stalled streams.

    curl's own low-speed check averages over several seconds and ignores the
    wait for headers, so a stream that goes silent is detected here instead:
    after its first byte, an attempt silent for ``stall_timeout_s`` is ended
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
        for exchange in list(self._live):
            if exchange.last_data_at is not None and exchange.last_data_at < deadline and not exchange.stalled:
                exchange.stalled = True
                exchange.cancel(STALL, "no data from the upstream")

    async def send(
        self,
        request: UpstreamRequest,
        *,
        timeout_s: float,
        abort: AbortFlag,
        on_headers: Callable[[int, HTTPHeaders], None],
        on_chunk: Callable[[bytes], None],
    ) -> Attempt:
        """One attempt. A 2xx response head is handed to ``on_headers`` and not kept on
        the Attempt (a stream would hold it for its whole life; every caller reads
        what it needs there); an error's head is kept, for Retry-After and relaying."""
        if abort.set_ or timeout_s <= 0:
            # Nothing was sent: the client already left, or no time is left.
            attempt = Attempt(outcome=CLIENT_GONE if abort.set_ else TIMEOUT)
            attempt.ended_at = attempt.started_at
            return attempt
        exchange = _Exchange(abort, on_headers, on_chunk, self._config, timeout_s)
        attempt = exchange.attempt
        if self._sweeper is None:
            self._sweeper = PeriodicCallback(self._sweep, 1000)
            self._sweeper.start()
        http_request = _SlottedHTTPRequest(
            request.url,
            method="POST",
            # Tornado copies these into its own HTTPHeaders; no copy needed here.
            headers=_with_identity_encoding(request.headers),  # type: ignore[arg-type]
            body=request.body,
            connect_timeout=self._config.connect_timeout_s,
            request_timeout=timeout_s,
            streaming_callback=exchange.chunk,
            prepare_curl_callback=exchange.prepare,
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
        )
        exchange.request = http_request
        exchange.client = self._client
        response: HTTPResponse | None
        error: BaseException | None
        self._live.add(exchange)
        loop = IOLoop.current()
        backstop = loop.call_later(timeout_s, exchange.deadline_passed)
        abort._listener = exchange.on_abort
        try:
            response = await self._client.fetch(http_request, raise_error=False)
        except CurlError as exc:
            # Since Tornado 6, raise_error=False only covers HTTP statuses;
            # transport failures still raise.
            response, error = None, exc
        else:
            error = response.error
        finally:
            exchange.done = True
            if abort._listener == exchange.on_abort:
                abort._listener = None
            loop.remove_timeout(backstop)
            self._live.discard(exchange)
            # The request holds the exchange's callbacks and the exchange the
            # request: a cycle per attempt for the garbage collector, unless cut here.
            exchange.request = None
            exchange.client = None
            exchange.curl = None
            http_request.streaming_callback = None
            http_request.prepare_curl_callback = None
        if response is not None and isinstance(error, HTTPClientError):
            # Tornado's error response and its error point at each other.
            error.response = None
        attempt.ended_at = time.monotonic()
        if exchange.refused is not None:
            # The response head itself was refused (a redirect, a compressed
            # body): the caller never sees it.
            attempt.outcome = REJECTED
            attempt.status = exchange.status or None
            attempt.message = exchange.refused
            return attempt
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
        elif exchange.timed_out:
            attempt.outcome = TIMEOUT
        elif isinstance(error, CurlError):
            attempt.outcome = _classify(error, attempt, exchange.connect_is_binding)
        else:
            attempt.outcome = ERROR
        attempt.message = str(error)
        return attempt


class _SlottedHTTPRequest(HTTPRequest):
    """Tornado's HTTPRequest with its attributes in slots.

    It lives as long as the stream it starts, and its 32 attributes made an
    instance dict of 1.6 KB (past CPython's key-sharing limit); in slots they
    take a quarter of that. An attribute a later Tornado adds still works (it
    lands in the instance dict).
    """

    __slots__ = (
        "_body", "_headers", "allow_ipv6", "allow_nonstandard_methods", "auth_mode", "auth_password",
        "auth_username", "body_producer", "ca_certs", "client_cert", "client_key", "connect_timeout",
        "decompress_response", "expect_100_continue", "follow_redirects", "header_callback", "max_redirects",
        "method", "network_interface", "prepare_curl_callback", "proxy_auth_mode", "proxy_host", "proxy_password",
        "proxy_port", "proxy_username", "request_timeout", "ssl_options", "start_time", "streaming_callback", "url",
        "user_agent", "validate_cert",
    )  # fmt: skip


def _with_identity_encoding(headers: Mapping[str, str]) -> Mapping[str, str]:
    """``headers`` asking for identity encoding, unless they already say what they accept.

    The relay counts and parses the bytes it passes on; a compressed body
    could be neither, so the upstream is asked for none.
    """
    for name in headers:
        if name.lower() == "accept-encoding":
            return headers
    return {**headers, "Accept-Encoding": "identity"}


class _Exchange:
    """One live attempt: curl's callbacks, the response head as parsed, and what the stall sweep sees.

    One slotted object with bound methods instead of closures and helper
    objects per attempt: thousands of streams stay open at once, and each
    closure cell and instance dict was memory held for a stream's whole life.
    """

    __slots__ = (
        "_connect_ms", "_on_chunk", "_on_headers", "_stall_s", "_timeout_ms", "abort", "attempt", "client",
        "complete", "curl", "done", "headers", "last_data_at", "refused", "request", "stalled", "status",
        "timed_out",
    )

    def __init__(
        self,
        abort: AbortFlag,
        on_headers: Callable[[int, HTTPHeaders], None],
        on_chunk: Callable[[bytes], None],
        config: UpstreamConfig,
        timeout_s: float,
    ) -> None:
        self.abort = abort
        self.attempt = Attempt()
        self._on_headers = on_headers
        self._on_chunk = on_chunk
        self._stall_s = config.stall_timeout_s
        # Never 0: curl reads a 0 ms timeout as "no timeout" (Tornado truncates
        # 0.9 ms to 0).
        self._timeout_ms = max(1, math.ceil(timeout_s * 1000))
        self._connect_ms = max(1, math.ceil(config.connect_timeout_s * 1000))
        self.last_data_at: float | None = None
        self.stalled = False
        self.timed_out = False
        self.done = False
        # Why the transport refused the response head (None: it did not).
        self.refused: str | None = None
        # The final response's status line and headers (1xx blocks are skipped).
        self.status = 0
        self.headers: HTTPHeaders | None = None
        self.complete = False
        # Set by send() / prepare(): what _cancel needs to find this transfer.
        self.client: AsyncHTTPClient | None = None
        self.request: HTTPRequest | None = None
        self.curl: pycurl.Curl | None = None

    @property
    def connect_is_binding(self) -> bool:
        """A timeout while connecting is a connect error only if the connect timeout,
        not the attempt's deadline, is what ran out (curl takes the smaller one)."""
        return self._connect_ms < self._timeout_ms

    def prepare(self, curl: pycurl.Curl) -> None:
        self.curl = curl
        request = self.request
        if request is not None:
            # Tornado called this last in setting the transfer up: curl has its own
            # header list and upload buffer now, and the request lives as long as
            # the stream; its copies of the headers and the prompt need not.
            request.headers = {}
            request.body = b""
        # libcurl keeps a 64 KB upload buffer per handle by default; request
        # bodies are small, and with thousands of open streams it was 40% of
        # the memory per stream. 16 KB is the least libcurl accepts.
        curl.setopt(pycurl.UPLOAD_BUFFERSIZE, 16384)
        curl.setopt(pycurl.HEADERFUNCTION, self.header_line)
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self.progress)
        # Tornado sets int(1000 * seconds), which is 0 ("no timeout") below 1 ms.
        curl.setopt(pycurl.TIMEOUT_MS, self._timeout_ms)
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, self._connect_ms)
        # Never follow a redirect (Tornado sets this too; it must not depend on that).
        curl.setopt(pycurl.FOLLOWLOCATION, 0)
        # A backstop only: the sweep is the precise stall detector.
        curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        curl.setopt(pycurl.LOW_SPEED_TIME, self._stall_s * 2)

    def progress(self, *_: Any) -> int:
        """curl XFERINFOFUNCTION: non-zero aborts the transfer (the fallback to ``cancel``)."""
        abort = self.abort
        return 1 if abort.set_ or abort.rejected is not None or self.stalled or self.timed_out else 0

    def header_line(self, raw: bytes) -> int | None:
        """curl HEADERFUNCTION: pure data, no application code (it runs inside curl).

        Returns 0 (curl then aborts the transfer) when the final response head
        is one the gateway refuses; None lets the transfer go on.
        """
        line = raw.decode("latin1").rstrip("\r\n")
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = HTTPHeaders()
            self.complete = False
        elif line:
            headers = self.headers
            if headers is None:
                headers = self.headers = HTTPHeaders()
            # What HTTPHeaders.parse_line does for a line without its CRLF, without
            # its per-line regex search for one. A garbled line (no colon, folded,
            # invalid characters: ``add`` validates) is dropped, not fatal.
            name, colon, value = line.partition(":")
            if colon and not line[0].isspace():
                with contextlib.suppress(HTTPInputError):
                    headers.add(name, value.strip(" \t"))
        elif self.status >= 200:
            self.refused = _refusal(self.status, self.headers)
            if self.refused is not None:
                return 0
            self.complete = True
            # The headers count as data for the stall sweep.
            self.last_data_at = time.monotonic()
        return None

    def dispatch_headers(self) -> None:
        # Runs on the IOLoop. curl can deliver a small response's body before
        # Tornado's queued header callbacks run, so headers are parsed
        # synchronously inside curl and handed over here, always before the
        # first chunk.
        attempt = self.attempt
        if self.complete and attempt.status is None and self.refused is None:
            attempt.status = self.status
            attempt.headers = self.headers if self.headers is not None else HTTPHeaders()
            attempt.first_byte_at = time.monotonic()
            self._on_headers(self.status, attempt.headers)
            if 200 <= self.status < 300:
                attempt.headers = self.headers = None

    def chunk(self, data: bytes) -> None:
        """Tornado's streaming_callback, on the IOLoop."""
        if self.refused is not None:
            return
        self.last_data_at = time.monotonic()
        if self.attempt.status is None:
            self.dispatch_headers()
        self._on_chunk(data)

    # -- ending the transfer early ----------------------------------------------------

    def on_abort(self) -> None:
        """The AbortFlag was set or rejected: end the transfer on the next IOLoop iteration.

        Not synchronously: ``reject`` is called from inside the caller's chunk
        callback, which Tornado may be running from inside its own ``_finish``.
        """
        if not self.done:
            IOLoop.current().add_callback(self.cancel, CLIENT_GONE if self.abort.set_ else REJECTED, "aborted by the gateway")

    def deadline_passed(self) -> None:
        """The attempt's deadline, on our own timer: curl's may not fire (or not have started)."""
        if not self.done:
            self.timed_out = True
            self.cancel(TIMEOUT, f"Operation timed out after {self._timeout_ms} milliseconds (gateway deadline)")

    def cancel(self, why: Outcome, message: str) -> None:
        """End this transfer now, as curl would on an error; the fetch completes once."""
        if self.done or self.client is None or self.request is None:
            return
        errno = pycurl.E_OPERATION_TIMEDOUT if why in (TIMEOUT, STALL) else pycurl.E_ABORTED_BY_CALLBACK
        _cancel(self.client, self.request, self.curl, errno, message)


def _refusal(status: int, headers: HTTPHeaders | None) -> str | None:
    """Why the gateway refuses a final response head, or None."""
    if 300 <= status < 400:
        return f"upstream provider answered with a redirect (HTTP {status}); the gateway does not follow or relay redirects"
    if 200 <= status < 300 and headers is not None:
        encoding = (headers.get("Content-Encoding") or "").strip().lower()
        if encoding not in _IDENTITY:
            return f"upstream provider sent a compressed body (Content-Encoding: {encoding[:40]}) though identity was asked for"
    return None


def _cancel(client: AsyncHTTPClient, request: HTTPRequest, curl: pycurl.Curl | None, errno: int, message: str) -> None:
    """End one fetch of Tornado's CurlAsyncHTTPClient now, whatever the transfer is doing.

    Tornado has no public cancel; this uses its internals (tornado 6.x
    ``curl_httpclient``), with the same steps as its own completion path:

    * running: ``_finish(curl, errno, message)`` takes the handle out of the
      multi handle (libcurl closes the connection of an unfinished transfer,
      so the upstream sees the disconnect), delivers the body chunks still
      buffered, calls the fetch's callback once with a ``CurlError``, resets
      the handle and puts it back on the free list; ``_process_queue`` then
      starts a queued request on it, as ``_finish_pending_requests`` does.
    * still queued (no handle yet): it is taken off the queue and its
      callback is called with the same error.

    The handle is ours only while ``curl.info["request"]`` is this request:
    after a transfer finished the handle may already serve another one.
    """
    finish = getattr(client, "_finish", None)
    if finish is None:
        return  # not the curl client: the XFERINFOFUNCTION fallback ends it
    if curl is not None:
        info = getattr(curl, "info", None)
        if info is None or _unwrap(info.get("request")) is not request:
            return  # already finished (and perhaps reused)
        finish(curl, errno, message)
        client._process_queue()  # type: ignore[attr-defined]
        return
    queue = getattr(client, "_requests", None)
    if queue is None:
        return
    for entry in queue:
        if _unwrap(entry[0]) is request:
            queue.remove(entry)
            entry[1](HTTPResponse(request, 599, error=CurlError(errno, message)))
            return


def _unwrap(proxy: Any) -> Any:
    """The HTTPRequest behind the ``_RequestProxy`` that ``fetch`` wraps it in."""
    return getattr(proxy, "request", proxy)


def _classify(error: CurlError, attempt: Attempt, connect_is_binding: bool = True) -> Outcome:
    errno = error.errno
    if errno == pycurl.E_OPERATION_TIMEDOUT:
        text = str(error).lower()
        if "too slow" in text:
            return STALL
        if attempt.status is None and "connect" in text and connect_is_binding:
            return CONNECT_ERROR
        return TIMEOUT
    if errno in _CONNECT_ERRNOS:
        return CONNECT_ERROR
    if errno in _RESET_ERRNOS:
        return RESET
    if errno == pycurl.E_ABORTED_BY_CALLBACK:
        return CLIENT_GONE
    return ERROR
