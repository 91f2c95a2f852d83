"""The one completions pipeline: auth -> validate -> limit -> upstream -> record.

Provider specifics live in upstreams/; this handler only knows the order of
things and what each outcome means for the client, the limiter and the
usage event. Once the first byte of a 2xx stream is flushed the status can
no longer change, so later failures end the stream with a provider-shaped
error event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import orjson
from tornado.httputil import HTTPHeaders
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from actors.limits import evaluate_allowed_models, is_model_allowed, prefix_bare_models
from actors.model import CHAT_COMPLETIONS, COMPLETION_FEATURES
from errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from handlers.admission import (
    LimitedRequest,
    rate_limit_headers,
    refresh_in_background,
    rejection,
)
from handlers.base import UpstreamHandler
from handlers.services import Services
from usage import events as ev
from upstreams import transport as tp
from upstreams.base import Provider, ProviderCall
from upstreams.buffered_call import MAX_BODY_FOR_USAGE

log = logging.getLogger("gateway.completions")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
        "Te", "Trailer", "Transfer-Encoding", "Upgrade",
    )
)
# Never relayed: framing is ours, cookies are the provider's business, and
# server identity headers would describe the provider rather than us.
NOT_RELAYED = HOP_BY_HOP | frozenset({"content-length", "set-cookie", "set-cookie2", "server", "date", "x-http-reason"})
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Without auto-flush, relay in blocks of this size (as Go's http server does).
_FLUSH_THRESHOLD = 4096

OUTCOME_COMPLETE = "complete"
OUTCOME_CLIENT_DISCONNECTED = "client_disconnected"
OUTCOME_UPSTREAM_ERROR = "upstream_error"
OUTCOME_ERROR = "error"
OUTCOME_CLIENT_TOO_SLOW = "client_too_slow"


class CompletionsHandler(UpstreamHandler):
    route_class = "completions"

    def initialize(self, services: Services, provider: Provider, sdk_route: bool = False, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.provider = provider
        self.operation = provider.operation
        self.sdk_route = sdk_route
        self.accepts_api_key_header = sdk_route
        self.limited = LimitedRequest(services)
        self.call: ProviderCall | None = None
        self.relaying = False
        self.first_byte_sent = False
        self.upstream_status: int | None = None
        self.upstream_started: float | None = None
        self.upstream_ended: float | None = None
        self.time_to_first_byte_s: float | None = None
        self.outcome = OUTCOME_ERROR
        self.chunks_relayed = 0
        self.extra_metadata: dict[str, Any] = {}
        self._error_body = bytearray()
        self._body_buffer = bytearray()
        self._last_chunk = b""
        self._auto_flush = services.config.server.auto_flush_streaming
        self._max_client_buffer = services.config.server.max_client_buffer_bytes
        self._flush_scheduled = False
        self._unflushed = 0
        self._pending_bytes = 0
        self.client_too_slow = False

    # -- request ----------------------------------------------------------------

    def feature_from_header(self) -> str:
        raw = self.request.headers.get("X-Sourcegraph-Feature")
        if raw is None or not raw.strip():
            if self.sdk_route:
                return CHAT_COMPLETIONS
            raise BadRequest("X-Sourcegraph-Feature header is required")
        feature = raw.strip()
        if feature not in COMPLETION_FEATURES:
            raise BadRequest("invalid value for X-Sourcegraph-Feature")
        return feature

    async def post(self) -> None:
        actor = self.actor
        assert actor is not None
        feature = self.feature_from_header()
        self.feature = feature
        rate_limit = actor.limit_for(feature)
        if rate_limit is None:
            refresh_in_background(self.services, actor, self.token)
            raise Forbidden(f"no access to feature {feature}")
        timeout_s = self.upstream_timeout_s()
        anonymous_uid = self.request.headers.get("X-Sourcegraph-Actor-UID", "")
        call = self.provider.parse(
            self.body(),
            feature=feature,
            identifier=f"{actor.id}:{anonymous_uid}",
            headers=self.request.headers,
        )
        provider = self.provider
        model = f"{provider.name}/{call.info.model}"
        self.model = model
        allowed = evaluate_allowed_models(prefix_bare_models(rate_limit.allowed_models, provider.name), provider.allowed_models)
        if not is_model_allowed(model, allowed, provider.virtual_models()):
            raise BadRequest(f'model "{model}" is not allowed, allowed: [{", ".join(allowed)}]')
        screen = self.services.extras.get("screen_request")
        if screen is not None:
            # Abuse flagging / blocking (issue 8) plugs in here; it raises to block.
            self.extra_metadata.update(await screen(self, call))
        self.set_header("X-Cody-Resolved-Model", model)

        rule = LimitedRequest.make_rule(
            actor.id, feature, rate_limit, lease_ttl_s=timeout_s + self.services.config.upstream.lease_grace_s
        )
        decision = await self.services.observe.limiter(
            self, rule, self.limited.acquire(rule, cost=1, token_reserve=max(0, call.info.max_tokens or 0))
        )
        if not decision.allowed:
            self.record_rate_limited(decision, feature)
            refresh_in_background(self.services, actor, self.token)
            raise rejection(decision, feature)
        for name, value in rate_limit_headers(decision).items():
            self.set_header(name, value)
        self.call = call
        breaker = self.services.extras.get("circuit_breaker")
        if breaker is not None and not breaker.available(model):
            raise ServiceUnavailable(
                f"model {model} is currently unavailable", headers={"Retry-After": str(provider.default_retry_after_s)}
            )
        await self.services.observe.upstream(self, self.relay(call, timeout_s, breaker))

    # -- upstream ------------------------------------------------------------------

    async def relay(self, call: ProviderCall, timeout_s: float, breaker: Any) -> None:
        config = self.services.config.upstream
        deadline = time.monotonic() + timeout_s
        request = call.upstream_request()
        self.upstream_started = time.monotonic()
        attempt_no = 0
        while True:
            attempt_no += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempt = tp.Attempt(outcome=tp.TIMEOUT)
                break
            self._error_body = bytearray()
            self._body_buffer = bytearray()
            self.relaying = False
            attempt = await self.services.transport.send(
                request,
                timeout_s=remaining,
                abort=self.abort,
                on_headers=self._on_upstream_headers,
                on_chunk=self._on_upstream_chunk,
            )
            self.services.observe.upstream_attempt(self, attempt)
            if breaker is not None and attempt.outcome != tp.CLIENT_GONE and not self.client_gone:
                breaker.record(self.model, attempt.status if attempt.outcome == tp.OK else _breaker_code(attempt))
            # Retries only while nothing reached the client: a 2xx that broke
            # before its first byte was sent (or a non-streamed body that broke
            # while being read) is retried like an error status.
            if self.first_byte_sent or self.client_gone or attempt_no >= config.retry_max_attempts:
                break
            delay = self._retry_delay(attempt, attempt_no)
            if delay is None or time.monotonic() + delay >= deadline:
                break
            log.info("retrying %s after %s (attempt %d)", self.provider.name, attempt.outcome if attempt.outcome != tp.OK else attempt.status, attempt_no)
            await asyncio.sleep(delay)
            if self.client_gone:
                break
        self.upstream_ended = time.monotonic()
        self.upstream_status = attempt.status
        await self._conclude(call, attempt)

    def _retry_delay(self, attempt: tp.Attempt, attempt_no: int) -> float | None:
        config = self.services.config.upstream
        if attempt.outcome == tp.OK:
            if attempt.status not in RETRYABLE_STATUSES:
                return None
            retry_after = _retry_after_seconds(attempt.headers)
            if retry_after is not None:
                if retry_after > config.retry_after_max_s:
                    return None
                return max(config.retry_base_delay_ms / 1000, retry_after)
        elif attempt.outcome not in (tp.CONNECT_ERROR, tp.RESET):
            return None
        cap = min(config.retry_max_delay_ms, config.retry_base_delay_ms * (2 ** (attempt_no - 1))) / 1000
        return random.uniform(0, cap)

    def _on_upstream_headers(self, status: int, headers: HTTPHeaders) -> None:
        if self.client_gone:
            return
        if 200 <= status < 300:
            call = self.call
            assert call is not None
            content_type = (headers.get("Content-Type") or "").lower()
            expected = "text/event-stream" if call.info.stream else "json"
            if content_type and expected not in content_type:
                self.abort.reject(
                    f"upstream provider {self.provider.name} returned an unexpected content type: {content_type[:80]}"
                )
                return
            self.relaying = True
            self.set_status(status)
            dropped = NOT_RELAYED | connection_named(headers)
            for name, value in headers.get_all():
                if name.lower() not in dropped:
                    self.add_header(name, value) if name.lower() in ("vary", "link") else self.set_header(name, value)

    def _on_upstream_chunk(self, chunk: bytes) -> None:
        if self.client_gone:
            return
        if not self.relaying:
            if len(self._error_body) < self.services.config.upstream.max_error_body_bytes:
                self._error_body += chunk
            return
        call = self.call
        assert call is not None
        if not call.info.stream:
            # A non-streamed answer is checked whole before any of it is sent, so a
            # cut-off or malformed body becomes a clear error (or a retry), not a 200.
            if len(self._body_buffer) + len(chunk) > MAX_BODY_FOR_USAGE:
                self.abort.reject(f"upstream provider {self.provider.name} returned a response larger than the gateway accepts")
                return
            self._body_buffer += chunk
            return
        call.feed(chunk)
        if call.protocol_error is not None:
            # Relaying bytes the provider's own format cannot explain would only
            # confuse the client; stop and say so in-band.
            self.abort.reject(f"upstream provider {self.provider.name} sent {call.protocol_error}")
            return
        self.chunks_relayed += 1
        self._last_chunk = chunk
        self.write(chunk)
        self._unflushed += len(chunk)
        if not self.first_byte_sent:
            self.first_byte_sent = True
            self.time_to_first_byte_s = time.monotonic() - self.started_at
            self._flush()
        elif self._auto_flush or self._unflushed >= _FLUSH_THRESHOLD:
            # Chunks curl delivers in one loop iteration share one flush (one send).
            if not self._flush_scheduled:
                self._flush_scheduled = True
                IOLoop.current().add_callback(self._flush)
        if self._pending_bytes + self._unflushed > self._max_client_buffer:
            # The client reads slower than the model writes; holding an unbounded
            # backlog for it would let one slow reader exhaust memory.
            self.client_too_slow = True
            self.abort.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._finished or self.client_gone:
            return
        amount = self._unflushed
        self._unflushed = 0
        self._pending_bytes += amount
        future = self.flush()

        def flushed(f: Any) -> None:
            self._pending_bytes -= amount
            _ignore_stream_closed(f)

        future.add_done_callback(flushed)

    async def _conclude(self, call: ProviderCall, attempt: tp.Attempt) -> None:
        provider = self.provider.name
        if self.client_too_slow and not self.client_gone:
            call.finish()
            self.outcome = OUTCOME_CLIENT_TOO_SLOW
            log.warning("ending a %s stream: the client reads too slowly", provider)
            self._write_in_band_error(call, "stream ended by the gateway: the client is not reading fast enough")
            self.finish()
            return
        if attempt.outcome == tp.CLIENT_GONE or self.client_gone:
            self.outcome = OUTCOME_CLIENT_DISCONNECTED
            call.finish()
            log.info("client disconnected from a %s request", provider)
            if not self._finished:
                self.finish()
            return
        if self.relaying and not call.info.stream and attempt.outcome == tp.OK:
            self._send_buffered_body(call)
            return
        if self.relaying:
            call.finish()
            if attempt.outcome == tp.OK:
                self.outcome = OUTCOME_UPSTREAM_ERROR if call.in_band_error else OUTCOME_COMPLETE
                self.finish()
                return
            message = _failure_message(attempt, provider, self.services.config.upstream.stall_timeout_s)
            if self.first_byte_sent:
                self.outcome = OUTCOME_UPSTREAM_ERROR
                self._write_in_band_error(call, message.message)
                self.finish()
                return
            self.clear_relayed_headers()
            raise message
        if attempt.outcome != tp.OK or attempt.status is None:
            raise _failure_message(attempt, provider, self.services.config.upstream.stall_timeout_s)
        self._write_upstream_error(attempt)

    def _write_in_band_error(self, call: ProviderCall, message: str) -> None:
        # The stream may have stopped mid-event: end that event first so the
        # error is an event of its own.
        last = self._last_chunk
        ended = not last or last.endswith((b"\n\n", b"\r\n\r\n"))
        separator = b"" if ended else b"\n\n"
        self.write(separator + call.stream_error_event(message))

    def _send_buffered_body(self, call: ProviderCall) -> None:
        body = bytes(self._body_buffer)
        self._body_buffer = bytearray()
        try:
            valid = isinstance(orjson.loads(body), dict)
        except orjson.JSONDecodeError:
            valid = False
        if not valid:
            call.finish()
            self.clear_relayed_headers()
            raise UpstreamError(f"upstream provider {self.provider.name} returned an invalid response (not a JSON object)")
        call.feed(body)
        call.finish()
        self.chunks_relayed = 1
        self.first_byte_sent = True
        self.time_to_first_byte_s = time.monotonic() - self.started_at
        self.outcome = OUTCOME_COMPLETE
        self.finish(body)

    def clear_relayed_headers(self) -> None:
        self.relaying = False
        self.set_status(200)

    def _write_upstream_error(self, attempt: tp.Attempt) -> None:
        status = attempt.status or 502
        headers = attempt.headers or HTTPHeaders()
        resolved = status
        if status == 429:
            # The provider's quota is shared by every actor: a client retrying
            # on 429 would only make it worse, so it is told "unavailable".
            log.error("upstream %s returned 429, rewriting to 503", self.provider.name)
            resolved = 503
        self.set_status(resolved)
        dropped = NOT_RELAYED | connection_named(headers) | {"retry-after"}
        for name, value in headers.get_all():
            if name.lower() not in dropped:
                self.set_header(name, value)
        if resolved == 503:
            self.set_header("Retry-After", headers.get("Retry-After") or str(self.provider.default_retry_after_s))
        if status >= 500:
            log.error("upstream %s returned %d", self.provider.name, status)
        self.outcome = OUTCOME_ERROR
        self.finish(bytes(self._error_body))

    # -- the end -----------------------------------------------------------------

    def finalize(self) -> None:
        """Exactly once per request: release the limiter and record the usage event."""
        call = self.call
        actor = self.actor
        if call is None or actor is None:
            self.limited.release(refund=True)
            return
        disconnected_early = self.outcome == OUTCOME_CLIENT_DISCONNECTED and not self.first_byte_sent
        resolved = None if disconnected_early else self.get_status()
        usage = call.usage()
        success = resolved is not None and 200 <= resolved < 300
        consumed = success or (self.outcome == OUTCOME_CLIENT_DISCONNECTED and self.first_byte_sent)
        self.limited.release(refund=not consumed, actual_tokens=usage.total_tokens())
        upstream_ms = None
        if self.upstream_started is not None:
            upstream_ms = int(((self.upstream_ended or time.monotonic()) - self.upstream_started) * 1000)
        metadata: dict[str, Any] = dict(call.info.metadata)
        metadata.update(self.extra_metadata)
        metadata.update(usage.event_fields())
        metadata.update(
            {
                "feature": self.feature,
                "model": self.model,
                "provider": self.provider.name,
                "upstream_request_duration_ms": upstream_ms,
                "upstream_status_code": self.upstream_status,
                "resolved_status_code": resolved,
                "time_to_first_byte_ms": None if self.time_to_first_byte_s is None else int(self.time_to_first_byte_s * 1000),
                "outcome": self.outcome,
                "sg_actor_id": self.request.headers.get("X-Sourcegraph-Actor-UID", ""),
                "sg_actor_anonymous_uid": self.request.headers.get("X-Sourcegraph-Actor-Anonymous-UID", ""),
            }
        )
        self.record_event(ev.Event(ev.COMPLETIONS_FINISHED, actor.source, actor.id, metadata))
        hook = self.services.extras.get("on_completion_finished")
        if hook is not None:
            self.after_response(lambda: hook(self, usage))


def connection_named(headers: HTTPHeaders) -> frozenset[str]:
    """Headers the upstream declares hop-by-hop in its Connection header (RFC 9110 7.6.1)."""
    values = headers.get_list("Connection")
    if not values:
        return frozenset()
    return frozenset(name.strip().lower() for value in values for name in value.split(",") if name.strip())


def _ignore_stream_closed(future: Any) -> None:
    exc = future.exception()
    if exc is not None and not isinstance(exc, StreamClosedError):
        log.warning("flush failed: %s", exc)


def _retry_after_seconds(headers: HTTPHeaders | None) -> float | None:
    if headers is None:
        return None
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _breaker_code(attempt: tp.Attempt) -> int:
    if attempt.outcome in (tp.TIMEOUT, tp.STALL):
        return 504
    return 0


def _failure_message(attempt: tp.Attempt, provider: str, stall_s: int) -> GatewayError:
    if attempt.outcome == tp.REJECTED:
        return UpstreamError(attempt.message)
    if attempt.outcome == tp.TIMEOUT:
        return UpstreamTimeout(f"request to upstream provider {provider} timed out")
    if attempt.outcome == tp.STALL:
        return UpstreamTimeout(f"upstream provider {provider} stalled: no data for {stall_s}s")
    if attempt.outcome == tp.CONNECT_ERROR:
        return UpstreamError(f"failed to connect to upstream provider {provider}")
    if attempt.outcome == tp.RESET:
        return UpstreamError(f"upstream provider {provider} closed the connection unexpectedly")
    return UpstreamError(f"failed to make request to upstream provider {provider}: {attempt.message}")
