"""The base handler: the one place where errors become HTTP responses.

Every response carries the trace headers; every error is JSON
``{"error": message}`` with ``Content-Type: application/json`` (SPEC point 1).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable
from typing import Any

import orjson
import tornado.web
from opentelemetry.trace import Span, Status, StatusCode

from actors.chain import TokenDeniedError
from actors.model import Actor
from actors.tokens import parse_bearer
from errors import BadRequest, Forbidden, GatewayError, NotFound, PayloadTooLarge, error_payload, error_style
from handlers.services import Services
from limiter.base import CONCURRENCY, Decision
from telemetry.record import RequestRecord
from telemetry.tracing import span_ids
from upstreams.transport import AbortFlag
from usage import events as ev
from usage.logger import with_request_context

log = logging.getLogger("gateway.http")

JSON_CONTENT_TYPE = "application/json"
# Client-sent identifiers (user ids, interaction ids) are cut to this many characters.
MAX_CLIENT_ID = 256
MAX_CLIENT_TEXT = 200


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(int(ts), tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class BaseHandler(tornado.web.RequestHandler):
    # Our per-request state lives in slots, Tornado's in the instance dict: a
    # handler lives as long as its stream, and an instance dict that grows
    # past CPython's key-sharing limit (30 keys, or keys set in another
    # order than the class's first instances set them) costs 1.6 KB instead
    # of a few hundred bytes per open stream.
    __slots__ = ("services", "record", "token", "resolved_model", "_finalized", "_counted")
    # Low-cardinality label for metrics and the span name.
    route_class = "other"
    operation = "http"

    def initialize(self, services: Services, *, operation: str | None = None, **_: Any) -> None:
        self.services = services
        request = self.request
        headers = request.headers
        record = self.record = RequestRecord(
            self.route_class, operation or self.operation, request.method or "", request.path,
            services.trusted_proxies.client_ip(request.remote_ip or "", headers),
            (headers.get("User-Agent") or "")[:MAX_CLIENT_TEXT], time.monotonic(),
        )  # fmt: skip
        # Client-chosen identifiers go into events and the upstream's metadata: bounded.
        record.actor_uid = (headers.get("X-Sourcegraph-Actor-UID") or "")[:MAX_CLIENT_ID]
        record.anonymous_uid = (headers.get("X-Sourcegraph-Actor-Anonymous-UID") or "")[:MAX_CLIENT_ID]
        record.interaction_id = (headers.get("X-Sourcegraph-Interaction-ID") or "")[:MAX_CLIENT_ID]
        # The caller's token, kept in memory for this request only (refreshes need it).
        self.token = ""
        # ``provider/model`` once the request's model passed the allowlist.
        self.resolved_model: str | None = None
        self._finalized = False
        self._counted = True
        services.in_flight += 1

    # The record is the request's state; these read it for the handlers' own logic.
    @property
    def actor(self) -> Actor | None:
        return self.record.actor

    @property
    def span(self) -> Span | None:
        return self.record.span

    @property
    def trace_id(self) -> str:
        return self.record.trace_id

    # -- lifecycle -----------------------------------------------------------

    def start_span(self) -> None:
        tracing = self.services.tracing
        request = self.request
        record = self.record
        span = record.span = tracing.start_request_span(
            f"{record.operation}.{request.method} {request.path}",
            request.headers,
            {"http.request.method": request.method or "", "url.path": request.path},
        )
        record.trace_id, record.span_id = span_ids(span)
        self.set_trace_headers()

    def set_trace_headers(self) -> None:
        record = self.record
        self.set_header("X-Trace", record.trace_id)
        self.set_header("X-Trace-Span", record.span_id)
        self.set_header("X-Span", record.span_id)

    def prepare(self) -> Awaitable[None] | None:  # Tornado's signature: subclasses may be coroutines
        self.start_span()
        return None

    def finish(self, chunk: Any = None) -> Any:
        # Usage events are journaled before the response's last byte leaves, so a
        # process killed right after a client saw its response finish has the
        # event on disk already.
        if not self._finished:
            self._finalize_once()
        return super().finish(chunk)

    def finalize(self) -> None:
        """Per-request accounting (limiter release, usage event): runs exactly once,
        before the response's last byte, or from on_finish if the response never ended."""

    def _finalize_once(self) -> None:
        if not self._finalized:
            self._finalized = True
            self.finalize()

    def on_finish(self) -> None:
        self._finalize_once()
        if self._counted:
            self._counted = False
            self.services.in_flight -= 1
        record = self.record
        status = record.status = self.get_status()
        # Metrics, span attributes and the access line: after the response is out,
        # before the request span ends.
        self.services.observer.finished(record)
        span = record.span
        if span is not None and span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        self.release_references()

    def release_references(self) -> None:
        """Break the reference cycles a handler's request made, once it is over.

        Whatever the garbage collector must free (rather than reference
        counting) is a cost per request, paid in collections that stall the
        loop; tests/test_request_garbage.py checks that a request leaves none.
        """

    # -- auth ------------------------------------------------------------------

    async def authenticate(self) -> Actor:
        """Resolve the caller; raises 400/401/403/503 as the reference does."""
        token = parse_bearer(self.request.headers.get("Authorization"))
        if not token and self.accepts_api_key_header:
            token = self.request.headers.get("x-api-key", "")
        self.token = token
        record = self.record
        try:
            actor = await self.services.observer.auth(record, self.services.actors.get(token))
        except TokenDeniedError as exc:
            self.record_event(ev.Event(ev.UNAUTHORIZED, exc.source, "unknown", {"reason": exc.reason}))
            raise
        if not actor.access_allowed(self.request.path):
            self.record_event(ev.Event(ev.ACCESS_DENIED, actor.source, actor.id, {}))
            if not token:
                where = "Authorization: Bearer <token> or x-api-key" if self.accepts_api_key_header else "Authorization: Bearer <token>"
                raise Forbidden(f"Cody Gateway access not enabled: no token was sent ({where}) and anonymous access is disabled")
            raise Forbidden("Cody Gateway access not enabled")
        record.actor = actor
        span = record.span
        if span is not None and span.is_recording():
            span.set_attribute("actor.id", actor.id)
            span.set_attribute("actor.source", actor.source)
        return actor

    # SDK-compatible routes also accept the Anthropic SDK's x-api-key header.
    accepts_api_key_header = False

    # -- events ------------------------------------------------------------------

    def record_event(self, event: ev.Event) -> None:
        record = self.record
        event = with_request_context(
            event,
            actor_uid=record.actor_uid,
            anonymous_uid=record.anonymous_uid,
            trace_id=record.trace_id,
            interaction_id=record.interaction_id,
        )
        self.services.observer.record_event(record, event, self.services.events)

    def record_rate_limited(self, decision: Decision, feature: str) -> None:
        """The reference's RateLimited event (sampled: usage/refusal_sampling.py), and the observer."""
        actor = self.actor
        assert actor is not None
        self.services.observer.rate_limited(self.record, decision)
        refusals = self.services.refusals.admit(actor.id, feature, decision.cause or "")
        if refusals is None:
            return
        metadata: dict[str, Any] = {"feature": feature, "cause": decision.cause, "refusals": refusals}
        if decision.cause == CONCURRENCY:
            metadata["error"] = f'"{feature}": concurrency limit exceeded'
        else:
            metadata["error"] = "rate limit exceeded"
            metadata["limit"] = decision.limit
            metadata["retry_after"] = rfc3339(time.time() + decision.retry_after_s)
        self.record_event(ev.Event(ev.RATE_LIMITED, actor.source, actor.id, metadata))

    # -- errors ------------------------------------------------------------------

    def write_json(self, status: int, payload: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", JSON_CONTENT_TYPE)
        self.finish(orjson.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message: str
        if isinstance(exc, GatewayError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError):
            message = exc.reason or self._reason or "error"
            if exc.log_message and status_code < 500:
                message = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            message = "internal server error"
        if status_code == 405:
            message = "method not allowed"
            self.set_header("Allow", ", ".join(allowed_methods(type(self))))
        self.record.error = message
        self.set_header("Content-Type", JSON_CONTENT_TYPE)
        self.finish(orjson.dumps(error_payload(error_style(self.request.path), status_code, message)))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            status_code = exc.status
        if self._headers_written:
            # The status is on the wire; the streaming pipeline already ended the
            # stream in-band. Nothing more can be said to this client.
            if not self._finished:
                self.finish()
            return
        self.clear()
        if self.resolved_model is not None:
            # Once the model is resolved, every answer names it (the reference's header).
            self.set_header("X-Cody-Resolved-Model", self.resolved_model)
        if self.body_unread():
            # Tornado closes a connection whose request body was never read;
            # saying so lets keep-alive clients open a new one instead of
            # finding a reset on their next request.
            self.set_header("Connection", "close")
        self.set_trace_headers()
        self.set_status(status_code, reason=None if status_code in _KNOWN_STATUSES else "Error")
        try:
            self.write_error(status_code, **kwargs)
        except Exception:
            log.exception("failed to write the error response")
        if not self._finished:
            self.finish()

    def body_unread(self) -> bool:
        return False

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, GatewayError):
            if value.status >= 500:
                log.warning("%s %s -> %d: %s", self.request.method, self.request.path, value.status, value.message)
            return
        if isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            return
        super().log_exception(typ, value, tb)


def allowed_methods(handler: type[tornado.web.RequestHandler]) -> list[str]:
    """The methods a handler class implements (for 405's Allow header)."""
    base = tornado.web.RequestHandler
    return [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") if getattr(handler, m.lower()) is not getattr(base, m.lower())]


_KNOWN_STATUSES = frozenset({400, 401, 403, 404, 405, 408, 413, 429, 500, 502, 503, 504})


class NotFoundHandler(BaseHandler):
    """Unknown paths: 404 in the error shape, whatever the method."""

    route_class = "unknown"

    def prepare(self) -> None:
        self.start_span()
        raise NotFound("404 page not found")


class DisabledRouteHandler(BaseHandler):
    """A route whose provider has no credentials: 404 naming the provider and the variable
    that enables it (a mistyped path keeps the plain 404)."""

    route_class = "disabled"

    def initialize(self, services: Services, message: str = "", **kwargs: Any) -> None:
        super().initialize(services, **kwargs)
        self.message = message

    def prepare(self) -> None:
        self.start_span()
        raise NotFound(self.message)


@tornado.web.stream_request_body
class BodyHandler(BaseHandler):
    """A POST endpoint whose body is read with a hard size cap.

    Reading the body ourselves lets an oversized request get a JSON 413 (Tornado's
    own limit answers a bare 400) and lets auth reject a caller before the body
    is read at all.
    """

    __slots__ = ("_body",)

    def initialize(self, services: Services, **kwargs: Any) -> None:
        super().initialize(services, **kwargs)
        # None once the body passed the cap (what arrives after is dropped).
        self._body: bytearray | None = bytearray()

    def body_unread(self) -> bool:
        future = getattr(self.request, "_body_future", None)
        return future is not None and not future.done()

    async def prepare(self) -> None:
        # Authenticated before the body is read: a stranger's upload costs nothing.
        self.start_span()
        self.check_content_length()
        await self.authenticate()

    def upstream_timeout_s(self) -> float:
        """X-Timeout-Ms (default and ceiling from the config); malformed is a 400."""
        upstream = self.services.config.upstream
        raw = self.request.headers.get("X-Timeout-Ms")
        if raw is None:
            return upstream.default_timeout_ms / 1000
        try:
            value = int(raw.strip())
        except ValueError:
            raise BadRequest("invalid X-Timeout-Ms header: must be an integer number of milliseconds") from None
        if value <= 0:
            raise BadRequest("invalid X-Timeout-Ms header: must be positive")
        return min(value, upstream.max_timeout_ms) / 1000

    @property
    def max_body(self) -> int:
        return self.services.config.server.max_body_bytes

    def check_content_length(self) -> None:
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise PayloadTooLarge(f"request body too large: {declared} bytes (at most {self.max_body})")

    def data_received(self, chunk: bytes) -> None:
        body = self._body
        if body is None:
            return
        if len(body) + len(chunk) > self.max_body:
            self._body = None
            if not self._finished:
                # A chunked upload has no Content-Length to refuse up front: answer as
                # soon as the cap is passed; Tornado then drops the rest of the body.
                error = PayloadTooLarge(f"request body too large (at most {self.max_body} bytes)")
                self.send_error(error.status, exc_info=(PayloadTooLarge, error, None))
            return
        body += chunk

    def on_connection_close(self) -> None:
        body_pending = self.body_unread()
        super().on_connection_close()
        if body_pending and not self._finished:
            # Tornado never resumes a handler whose upload was cut off (client gone
            # or body timeout), so its end-of-request bookkeeping runs here.
            self.set_status(408)
            self.on_finish()

    def body(self) -> bytes:
        """The request body, handed over: the handler keeps no copy of it.

        A streaming request lives for minutes; its prompt is needed once, to
        build the upstream request, and was held three times over (this
        buffer, the parsed call's upstream body and curl's upload buffer).
        A second call returns an empty body.
        """
        body = self._body
        if body is None:
            raise PayloadTooLarge(f"request body too large (at most {self.max_body} bytes)")
        self._body = bytearray()
        return bytes(body)


class UpstreamHandler(BodyHandler):
    """A body endpoint that calls a provider: a client that leaves aborts that call."""

    __slots__ = ("abort", "client_gone")

    def initialize(self, services: Services, **kwargs: Any) -> None:
        super().initialize(services, **kwargs)
        self.abort = AbortFlag()
        # Set when the client's connection closed.
        self.client_gone = False

    def on_connection_close(self) -> None:
        self.client_gone = True
        self.abort.set()
        super().on_connection_close()
