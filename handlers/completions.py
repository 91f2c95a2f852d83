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
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson
from tornado.httputil import HTTPHeaders

from abuse.screening import Subject
from actors.limits import model_admitted, provider_allowlist
from errors import BadRequest, ServiceUnavailable, UpstreamError
from handlers.admission import (
    LimitedRequest,
    completion_feature,
    limit_for_feature,
    rate_limit_headers,
    refresh_in_background,
    rejection,
)
from handlers.base import UpstreamHandler
from handlers.relay import StreamRelay
from handlers.services import Services
from telemetry.record import Outcome
from upstreams import transport as tp
from upstreams.base import Provider, ProviderCall
from upstreams.buffered_call import MAX_BODY_FOR_USAGE
from upstreams.circuit import CircuitBreaker
from upstreams.retry import failure_error
from usage import events as ev

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


_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class CompletionsHandler(UpstreamHandler):
    """auth (prepare) -> validate -> limit -> upstream -> relay -> record (finalize)."""

    route_class = "completions"

    __slots__ = (
        "provider", "sdk_route", "limited", "relaying", "upstream_asked", "relay", "call", "last_attempt",
        "extra_metadata", "_error_body", "_body_buffer", "client_too_slow",
    )  # fmt: skip

    def initialize(self, services: Services, provider: Provider, sdk_route: bool = False, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, operation=provider.operation, **kwargs)
        self.provider = provider
        self.record.provider = provider.name
        self.sdk_route = sdk_route
        self.limited = LimitedRequest(services)
        self.relaying = False
        # Whether the request was handed to an upstream, and what the last attempt gave.
        self.upstream_asked = False
        self.call: ProviderCall | None = None
        self.last_attempt: tp.Attempt | None = None
        self.extra_metadata: Mapping[str, Any] = _NO_METADATA
        # An upstream error body, and a non-streamed answer, as they arrive (made when needed).
        self._error_body: bytearray | None = None
        self._body_buffer: bytearray | None = None
        self.client_too_slow = False
        server = services.config.server
        self.relay = StreamRelay(
            self, self._relay_closed, auto_flush=server.auto_flush_streaming, max_buffer=server.max_client_buffer_bytes
        )

    @property
    def accepts_api_key_header(self) -> bool:  # type: ignore[override]
        return self.sdk_route

    def _relay_closed(self) -> bool:
        return self._finished or self.client_gone

    # -- 1. validate -------------------------------------------------------------

    async def post(self) -> None:
        record = self.record
        actor = record.actor
        assert actor is not None
        feature = record.feature = completion_feature(self.request.headers, required=not self.sdk_route)
        rate_limit = limit_for_feature(self.services, actor, self.token, feature)
        timeout_s = self.upstream_timeout_s()
        headers = self.request.headers
        call = self.provider.parse(
            self.body(),
            feature=feature,
            identifier=f"{actor.id}:{record.actor_uid}",
            headers=headers,
        )
        provider = self.provider
        info = call.info
        model = record.model = f"{provider.name}/{info.model}"
        record.upstream_model, record.stream, record.max_tokens = info.model, info.stream, info.max_tokens
        record.dropped_fields = info.dropped_fields
        record.traced = bool(getattr(call, "traced", False))
        allowed = provider_allowlist(rate_limit.allowed_models, provider.name, provider.allowed_models)
        if not model_admitted(model, allowed, provider):
            raise BadRequest(f'model "{model}" is not allowed, allowed: [{", ".join(allowed)}]')
        screening = self.services.screening
        if screening is not None:
            verdict = await screening.screen(
                Subject(actor, feature, provider.name, record.trace_id, record.actor_uid, record.anonymous_uid),
                call,
            )  # fmt: skip
            if verdict.blocked is not None:
                self.record_event(verdict.blocked)
            if verdict.error is not None:
                raise verdict.error
            if verdict.metadata:
                self.extra_metadata = {**self.extra_metadata, **verdict.metadata}
        self.resolved_model = model
        self.set_header("X-Cody-Resolved-Model", model)

        # -- 2. limit ---------------------------------------------------------------
        rule = self.limited.make_rule(actor.id, feature, rate_limit, timeout_s=timeout_s)
        decision = await self.services.observer.limiter(
            record, rule, self.limited.acquire(rule, cost=1, token_reserve=max(0, info.max_tokens or 0))
        )
        if not decision.allowed:
            self.record_rate_limited(decision, feature)
            refresh_in_background(self.services, actor, self.token)
            raise rejection(decision, feature)
        record.decision = decision
        for name, value in rate_limit_headers(decision).items():
            self.set_header(name, value)
        self.call = call
        breaker = self.services.circuit_breaker
        if breaker is not None and not breaker.available(model):
            raise ServiceUnavailable(
                f"model {model} is currently unavailable", headers={"Retry-After": str(provider.default_retry_after_s)}
            )
        # -- 3. upstream and relay -----------------------------------------------------
        observer = self.services.observer
        observer.upstream_started(record)
        try:
            await self.call_upstream(call, timeout_s, breaker)
        finally:
            observer.upstream_ended(record)

    async def call_upstream(self, call: ProviderCall, timeout_s: float, breaker: CircuitBreaker | None) -> None:
        record = self.record
        deadline = time.monotonic() + timeout_s
        # A timeout of a deadline the client chose says nothing about the upstream's health.
        deadline_is_clients = timeout_s < self.services.config.upstream.default_timeout_ms / 1000
        request = call.upstream_request()
        policy = self.services.retry_policy
        record.upstream_started = time.monotonic()
        attempt_no = 0
        while True:
            attempt_no += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempt = tp.Attempt(outcome=tp.TIMEOUT)
                break
            self._error_body = None
            self._body_buffer = None
            self.relaying = False
            self.upstream_asked = self.upstream_asked or not self.client_gone
            attempt = await self.services.transport.send(
                request,
                timeout_s=remaining,
                abort=self.abort,
                on_headers=self._on_upstream_headers,
                on_chunk=self._on_upstream_chunk,
            )
            self.services.observer.upstream_attempt(record, attempt)
            if breaker is not None and not self.client_gone:
                breaker.record_attempt(record.model or "", attempt.outcome, attempt.status, deadline_is_clients=deadline_is_clients)
            # Retries only while nothing reached the client: a 2xx that broke
            # before its first byte was sent (or a non-streamed body that broke
            # while being read) is retried like an error status.
            if self.relay.first_byte_sent or self.client_gone:
                break
            delay = policy.delay(attempt, attempt_no)
            if delay is None or time.monotonic() + delay >= deadline:
                break
            log.info("retrying %s after %s (attempt %d)", self.provider.name, attempt.outcome if attempt.outcome != tp.OK else attempt.status, attempt_no)
            await asyncio.sleep(delay)
            if self.client_gone:
                break
        record.upstream_ended = time.monotonic()
        record.upstream_status = attempt.status
        self.last_attempt = attempt
        self._conclude(call, attempt)

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
            error_body = self._error_body
            if error_body is None:
                error_body = self._error_body = bytearray()
            if len(error_body) < self.services.config.upstream.max_error_body_bytes:
                error_body += chunk
            return
        call = self.call
        assert call is not None
        if not call.info.stream:
            # A non-streamed answer is checked whole before any of it is sent, so a
            # cut-off or malformed body becomes a clear error (or a retry), not a 200.
            buffer = self._body_buffer
            if buffer is None:
                buffer = self._body_buffer = bytearray()
            if len(buffer) + len(chunk) > MAX_BODY_FOR_USAGE:
                self.abort.reject(f"upstream provider {self.provider.name} returned a response larger than the gateway accepts")
                return
            buffer += chunk
            return
        relayed = call.feed(chunk)
        if call.protocol_error is not None:
            # Relaying bytes the provider's own format cannot explain would only
            # confuse the client; stop and say so in-band.
            self.abort.reject(f"upstream provider {self.provider.name} sent {call.protocol_error}")
            return
        if relayed is not None:
            chunk = relayed
            if not chunk:
                return
        record = self.record
        record.chunks += 1
        first = record.ttfb_s is None
        if first:
            record.ttfb_s = time.monotonic() - record.started_at
        if not self.relay.write(chunk):
            # The client reads slower than the model writes; holding an unbounded
            # backlog for it would let one slow reader exhaust memory.
            self.client_too_slow = True
            self.abort.set()
        if first and self._headers_written:
            # Tornado never reads the response headers again once they are on the
            # wire, and a stream would hold them (a dozen values) for its whole life.
            self._headers = HTTPHeaders()

    def _conclude(self, call: ProviderCall, attempt: tp.Attempt) -> None:
        record = self.record
        provider = self.provider.name
        if self.client_too_slow and not self.client_gone:
            call.finish()
            record.outcome = Outcome.CLIENT_TOO_SLOW
            log.warning("ending a %s stream: the client reads too slowly", provider)
            self.relay.in_band_error(call.stream_error_event("stream ended by the gateway: the client is not reading fast enough"))
            self.finish()
            return
        if attempt.outcome == tp.CLIENT_GONE or self.client_gone:
            record.outcome = Outcome.CLIENT_DISCONNECTED
            call.finish()
            log.info("client disconnected from a %s request", provider)
            if not self._finished:
                self.finish()
            return
        if self.relaying and not call.info.stream and attempt.outcome == tp.OK:
            self._send_buffered_body(call)
            return
        stall_s = self.services.config.upstream.stall_timeout_s
        if self.relaying:
            call.finish()
            if attempt.outcome == tp.OK:
                record.outcome = Outcome.UPSTREAM_ERROR if call.in_band_error else Outcome.COMPLETE
                self.finish()
                return
            error = failure_error(attempt, provider, stall_s=stall_s)
            if self.relay.first_byte_sent:
                record.outcome = Outcome.UPSTREAM_ERROR
                self.relay.in_band_error(call.stream_error_event(error.message))
                self.finish()
                return
            self.clear_relayed_headers()
            raise error
        if attempt.outcome != tp.OK or attempt.status is None:
            raise failure_error(attempt, provider, stall_s=stall_s)
        self._write_upstream_error(attempt)

    def _send_buffered_body(self, call: ProviderCall) -> None:
        body = bytes(self._body_buffer or b"")
        self._body_buffer = None
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
        record = self.record
        record.chunks = 1
        self.relay.first_byte_sent = True
        record.ttfb_s = time.monotonic() - record.started_at
        record.outcome = Outcome.COMPLETE
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
        self.record.outcome = Outcome.ERROR
        self.finish(bytes(self._error_body or b""))

    def release_references(self) -> None:
        super().release_references()
        self.relay.detach()

    # -- 4. record ------------------------------------------------------------------

    def finalize(self) -> None:
        """Exactly once per request: release the limiter and record the usage event."""
        call = self.call
        record = self.record
        actor = record.actor
        if call is None or actor is None:
            self.limited.release(refund=True)
            return
        outcome = record.outcome or Outcome.ERROR
        first_byte_sent = self.relay.first_byte_sent
        disconnected_early = outcome is Outcome.CLIENT_DISCONNECTED and not first_byte_sent
        resolved = None if disconnected_early else self.get_status()
        usage = call.usage()
        record.input_tokens, record.output_tokens = usage.prompt_tokens, usage.completion_tokens
        record.cache_read_tokens = usage.cache_read_tokens
        record.cache_creation_tokens = usage.cache_creation_tokens
        record.reasoning_tokens = usage.reasoning_tokens
        success = resolved is not None and 200 <= resolved < 300
        self.limited.release(refund=not (success or self._reached_upstream()), actual_tokens=usage.total_tokens())
        upstream_s = record.upstream_seconds(time.monotonic())
        ttfb = record.ttfb_s
        metadata: dict[str, Any] = dict(call.info.metadata)
        metadata.update(self.extra_metadata)
        metadata.update(usage.event_fields())
        metadata.update(
            {
                "feature": record.feature,
                "model": record.model,
                "provider": record.provider,
                "upstream_request_duration_ms": None if upstream_s is None else int(upstream_s * 1000),
                "upstream_status_code": record.upstream_status,
                "resolved_status_code": resolved,
                "time_to_first_byte_ms": None if ttfb is None else int(ttfb * 1000),
                "outcome": outcome.value,
                "sg_actor_id": record.actor_uid,
                "sg_actor_anonymous_uid": record.anonymous_uid,
            }
        )
        self.record_event(ev.Event(ev.COMPLETIONS_FINISHED, actor.source, actor.id, metadata))


    def _reached_upstream(self) -> bool:
        """Charged once asked: the upstream works (and bills) whatever the client does next.
        Refunded: what never left the gateway, and what the upstream refused or never answered."""
        attempt = self.last_attempt
        if not self.upstream_asked or attempt is None:
            return False
        if attempt.outcome == tp.OK:
            return 200 <= (attempt.status or 0) < 300
        return attempt.outcome not in (tp.CONNECT_ERROR, tp.REJECTED)


def connection_named(headers: HTTPHeaders) -> frozenset[str]:
    """Headers the upstream declares hop-by-hop in its Connection header (RFC 9110 7.6.1)."""
    values = headers.get_list("Connection")
    if not values:
        return frozenset()
    return frozenset(name.strip().lower() for value in values for name in value.split(",") if name.strip())
