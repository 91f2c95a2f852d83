"""OTLP/HTTP span export from the event loop.

The SDK's BatchSpanProcessor + OTLPSpanExporter encode protobuf in a thread
and post through ``requests``: about 140 µs of CPU per span, and the thread
holds the GIL in 5 ms slices while the loop waits (it was a third of a small
request's cost). Here ended spans are queued in a list, encoded as OTLP/JSON
with orjson (or as protobuf when asked) in batches on the loop, and posted
through a small dedicated curl client, so no second thread competes for the
GIL and a post never blocks the loop.

The queue is bounded: when the collector is slow or down, spans beyond
``queue_size`` are dropped and counted (``stats``), never buffered without
limit. A failed post is retried with backoff when the failure is transient
(connection errors, 429, 502, 503, 504), within the export timeout.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from tornado.httpclient import (
    AsyncHTTPClient,
    HTTPClientError,
    HTTPRequest,
    HTTPResponse,
)

from background import BackgroundTasks
from telemetry.spans import LeanSpan

log = logging.getLogger("gateway.tracing")

JSON = "http/json"
PROTOBUF = "http/protobuf"
_CONTENT_TYPES = {JSON: "application/json", PROTOBUF: "application/x-protobuf"}
_RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
_MAX_POSTS_IN_FLIGHT = 2
_FIRST_BACKOFF_S = 0.5


@dataclass(slots=True)
class ExportStats:
    """Plain counters, read by the metrics collector and the tests."""

    exported: int = 0
    dropped: int = 0
    failed: int = 0
    posts: int = 0
    retries: int = 0


def parse_headers(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` (values URL-encoded), as OTEL_EXPORTER_OTLP_HEADERS is written."""
    headers: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip())] = unquote(value.strip())
    return headers


# --- OTLP/JSON encoding -------------------------------------------------------
# Field names, hex ids, string int64s and integer enums as the OTLP/JSON
# mapping of the protobuf schema prescribes.


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):  # before int: bool is an int
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [_any_value(item) for item in value]}}
    return {"stringValue": str(value)}


# Encoded attributes by (key, type, value): most of a request's attributes
# (provider, model, feature, status codes, small counts) repeat from one span
# to the next, and orjson encodes a shared dict as well as a fresh one.
_ENCODED: dict[tuple[str, type, Any], dict[str, Any]] = {}
_ENCODED_MAX = 8192


def _attribute(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, float):  # timings: nearly never the same twice
        return {"key": key, "value": {"doubleValue": value}}
    cache_key = (key, type(value), value)
    try:
        return _ENCODED[cache_key]
    except KeyError:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()  # bounded; the values in use come back at once
        encoded = _ENCODED[cache_key] = {"key": key, "value": _any_value(value)}
        return encoded
    except TypeError:  # unhashable (a list)
        return {"key": key, "value": _any_value(value)}


def _attributes(attributes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not attributes:
        return []
    return [_attribute(key, value) for key, value in attributes.items()]


def _lean_span_json(span: LeanSpan) -> dict[str, Any]:
    """``_span_json`` for the gateway's own spans, reading their fields directly.

    ReadableSpan's properties copy on every read (a MappingProxyType for the
    attributes, tuples for events and links): a measurable share of encoding.
    """
    context = span._context
    parent = span._parent
    flags = context.trace_flags | 0x100
    out: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span._name,
        "kind": span._kind.value + 1,
        "startTimeUnixNano": str(span._start_time),
        "endTimeUnixNano": str(span._end_time or 0),
        "attributes": _attributes(span._attributes),
    }
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
        if parent.is_remote:
            flags |= 0x200
    out["flags"] = flags
    if context.trace_state:
        out["traceState"] = context.trace_state.to_header()
    if span._events or span._links:
        # Rare (exceptions, links): the general path knows them.
        return _span_json(span)
    status = span._status
    code = status.status_code.value
    out["status"] = {"code": code, "message": status.description or ""} if code else {}
    return out


def _span_json(span: ReadableSpan) -> dict[str, Any]:
    context = span.context
    parent = span.parent
    # OTLP's span flags: the W3C trace flags plus "whether the parent is remote is known" (0x100) and "is remote" (0x200).
    flags = (context.trace_flags if context is not None else 0) | 0x100
    out: dict[str, Any] = {
        "traceId": format(context.trace_id, "032x") if context is not None else "",
        "spanId": format(context.span_id, "016x") if context is not None else "",
        "name": span.name,
        "kind": span.kind.value + 1,  # the SDK counts from INTERNAL = 0, OTLP from UNSPECIFIED = 0
        "startTimeUnixNano": str(span.start_time or 0),
        "endTimeUnixNano": str(span.end_time or 0),
        "attributes": _attributes(span.attributes),
    }
    if parent is not None:
        out["parentSpanId"] = format(parent.span_id, "016x")
        if parent.is_remote:
            flags |= 0x200
    out["flags"] = flags
    if context is not None and context.trace_state:
        out["traceState"] = context.trace_state.to_header()
    if span.events:
        out["events"] = [
            {"timeUnixNano": str(event.timestamp), "name": event.name, "attributes": _attributes(event.attributes)}
            for event in span.events
        ]
    if span.links:
        out["links"] = [
            {
                "traceId": format(link.context.trace_id, "032x"),
                "spanId": format(link.context.span_id, "016x"),
                "attributes": _attributes(link.attributes),
                "flags": link.context.trace_flags | 0x100 | (0x200 if link.context.is_remote else 0),
            }
            for link in span.links
        ]
    status = span.status
    if status.status_code.value:
        out["status"] = {"code": status.status_code.value, "message": status.description or ""}
    else:
        out["status"] = {}
    return out


def encode_json(spans: Sequence[ReadableSpan]) -> bytes:
    """One ExportTraceServiceRequest in OTLP/JSON, spans grouped by resource and scope."""
    groups: dict[tuple[int, int], tuple[Any, Any, list[dict[str, Any]]]] = {}
    for span in spans:
        if type(span) is LeanSpan:
            resource, scope, one = span._resource, span._instrumentation_scope, _lean_span_json(span)
        else:
            resource, scope, one = span.resource, span.instrumentation_scope, _span_json(span)
        key = (id(resource), id(scope))
        group = groups.get(key)
        if group is None:
            group = groups[key] = (resource, scope, [])
        group[2].append(one)
    by_resource: dict[int, dict[str, Any]] = {}
    for resource, scope, encoded in groups.values():
        entry = by_resource.get(id(resource))
        if entry is None:
            entry = by_resource[id(resource)] = {
                "resource": {"attributes": _attributes(resource.attributes if resource is not None else None)},
                "scopeSpans": [],
            }
        scope_json: dict[str, Any] = {"name": scope.name if scope is not None else ""}
        if scope is not None and scope.version:
            scope_json["version"] = scope.version
        entry["scopeSpans"].append({"scope": scope_json, "spans": encoded})
    return orjson.dumps({"resourceSpans": list(by_resource.values())})


def encode_protobuf(spans: Sequence[ReadableSpan]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return encode_spans(spans).SerializePartialToString()  # type: ignore[no-any-return]


# --- the processor --------------------------------------------------------------


class LoopSpanExporter(SpanProcessor):
    """Queues ended spans; encodes and posts them in batches on the event loop.

    Must be built on the loop that serves requests. Spans ended on other
    threads are handed to the loop; ``force_flush`` works from any thread
    other than the loop's (the loop's own shutdown path awaits ``aclose``).
    """

    def __init__(
        self,
        url: str,
        *,
        protocol: str = JSON,
        headers: Mapping[str, str] | None = None,
        compression: str = "none",
        timeout_s: float = 10.0,
        batch_size: int = 128,
        queue_size: int = 4096,
        delay_s: float = 0.5,
        client_factory: Callable[[], AsyncHTTPClient] | None = None,
    ) -> None:
        if protocol not in _CONTENT_TYPES:
            raise ValueError(f"unsupported OTLP protocol {protocol!r}")
        self.url = url
        self.stats = ExportStats()
        self._encode = encode_json if protocol == JSON else encode_protobuf
        self._headers = {**(headers or {}), "Content-Type": _CONTENT_TYPES[protocol]}
        self._gzip = compression == "gzip"
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._timeout_s = timeout_s
        self._batch_size = batch_size
        self._queue_size = queue_size
        self._delay_s = delay_s
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._client_factory = client_factory or _dedicated_client
        self._client: AsyncHTTPClient | None = None
        self._queue: list[ReadableSpan] = []
        self._in_flight = 0  # posts running, each holding up to one batch
        self._held = 0  # spans inside those posts (retries included)
        self._flush_scheduled = False
        self._draining = False  # a flush of everything asked for and not finished yet
        self._posts = BackgroundTasks(log)
        self._waiters: list[threading.Event] = []  # force_flush calls waiting for the queue to drain
        self._closed = False
        self._timer = self._loop.call_later(self._delay_s, self._tick)
        self._last_warning = 0.0

    # SpanProcessor

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled or self._closed:
            return
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self.on_end, span)
            return
        if len(self._queue) + self._held >= self._queue_size:
            self.stats.dropped += 1
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch_size and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def shutdown(self) -> None:
        self.force_flush()
        self._closed = True
        if threading.get_ident() == self._loop_thread:
            self._timer.cancel()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._timer.cancel)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Every span ended so far posted (or given up), within the timeout.

        On the loop's own thread it cannot wait for the loop: it only starts
        the posts and answers whether nothing was left (use ``aclose``).
        """
        if threading.get_ident() == self._loop_thread:
            self._flush(everything=True)
            return not self._queue and self._in_flight == 0
        if self._loop.is_closed():
            return not self._queue
        done = threading.Event()
        # The flush runs after whatever the loop is doing now, so spans that
        # end in the current loop callback are included.
        self._loop.call_soon_threadsafe(self._flush_then_signal, done)
        return done.wait(timeout_millis / 1000)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Post what is queued and wait for the posts, from the loop (the gateway's shutdown)."""
        deadline = self._loop.time() + timeout_s
        self._flush(everything=True)
        while (self._queue or self._in_flight) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        self._closed = True
        self._timer.cancel()
        self.stats.dropped += len(self._queue)
        self._queue.clear()
        await self._posts.cancel()  # past the deadline: give up on them
        if self._client is not None:
            self._client.close()
            self._client = None

    # the loop side

    def _tick(self) -> None:
        if self._closed:
            return
        self._flush(everything=True)
        self._timer = self._loop.call_later(self._delay_s, self._tick)

    def _flush(self, everything: bool = False) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        everything = everything or self._draining
        while self._queue and self._in_flight < _MAX_POSTS_IN_FLIGHT:
            if len(self._queue) < self._batch_size and not everything:
                break
            batch = self._queue[: self._batch_size]
            del self._queue[: self._batch_size]
            try:
                body = self._encode(batch)
                if self._gzip:
                    body = gzip.compress(body, compresslevel=1)
            except Exception:
                self.stats.failed += len(batch)
                log.exception("could not encode %d spans for OTLP", len(batch))
                continue
            self._in_flight += 1
            self._held += len(batch)
            self._posts.spawn(self._post(body, len(batch)), "OTLP export task")
        self._draining = everything and bool(self._queue)
        self._notify_if_idle()

    async def _post(self, body: bytes, count: int) -> None:
        deadline = self._loop.time() + self._timeout_s
        backoff = _FIRST_BACKOFF_S
        try:
            while True:
                self.stats.posts += 1
                status, reason = await self._send(body, deadline)
                if 200 <= status < 300:
                    self.stats.exported += count
                    return
                retryable = status == 599 or status in _RETRYABLE_STATUSES
                if not retryable or self._closed or self._loop.time() + backoff >= deadline:
                    self.stats.failed += count
                    self._warn(f"OTLP export of {count} spans failed: {reason}")
                    return
                self.stats.retries += 1
                await asyncio.sleep(backoff)
                backoff *= 2
        finally:
            self._in_flight -= 1
            self._held -= count
            # A post finishing frees a slot for a batch that waited.
            self._flush()

    async def _send(self, body: bytes, deadline: float) -> tuple[int, str]:
        if self._client is None:
            self._client = self._client_factory()
        timeout = max(0.1, deadline - self._loop.time())
        request = HTTPRequest(
            self.url,
            method="POST",
            body=body,
            headers=self._headers,
            request_timeout=timeout,
            connect_timeout=min(timeout, 5.0),
            follow_redirects=False,
            decompress_response=False,
        )
        try:
            response: HTTPResponse = await self._client.fetch(request, raise_error=False)
        except HTTPClientError as exc:  # only if the client is closed under us
            return 599, str(exc)
        if response.code == 599:
            return 599, type(response.error).__name__ if response.error else "no response"
        return response.code, f"HTTP {response.code}"

    def _flush_then_signal(self, done: threading.Event) -> None:
        if self._closed:  # nothing will be posted any more
            done.set()
            return
        self._waiters.append(done)
        self._flush(everything=True)

    def _notify_if_idle(self) -> None:
        if not self._queue and self._in_flight == 0 and self._waiters:
            waiters, self._waiters = self._waiters, []
            for done in waiters:
                done.set()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(message)


def _dedicated_client() -> AsyncHTTPClient:
    # Its own two handles: span posts neither take the upstreams' slots nor
    # queue behind long completions.
    from tornado.curl_httpclient import CurlAsyncHTTPClient

    return CurlAsyncHTTPClient(force_instance=True, max_clients=_MAX_POSTS_IN_FLIGHT)
