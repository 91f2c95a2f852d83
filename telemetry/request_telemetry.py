"""Everything on-call sees about a request, built from its ``RequestRecord``.

``RequestTelemetry`` is the gateway's ``RequestObserver``: Prometheus
metrics, spans (auth, limiter and event child spans, the upstream call and
its attempts), the access line, Sentry and quota notifications, all read
from the record the handler filled, never from the handler. Per request
this costs a few dictionary lookups, a handful of metric updates and one
log line; nothing runs per streamed chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind

from conf.model import Config
from telemetry.logs import AccessLog, add_secrets_to_log_scrubbing, config_secrets
from telemetry.metrics import FEATURES, OTHER, GatewayMetrics, RequestFacts
from telemetry.notify import QuotaNotifier
from telemetry.record import RequestRecord
from telemetry.sentry import SentryReporter
from telemetry.tracing import (
    GENAI_OPERATIONS,
    SPAN_AUTH,
    SPAN_EVENT,
    SPAN_LIMITER,
    Tracing,
    genai_attributes,
    limiter_attributes,
    mark_error,
)

if TYPE_CHECKING:
    from actors.model import Actor
    from limiter.base import Decision, LimitRule
    from usage.events import Event, EventRecorder

log = logging.getLogger("gateway.telemetry")


QUOTA = "quota"
_MAX_TEXT = 200
_SAMPLE_INTERVAL_MS = 5000
# Distinct unknown field names logged at most (each once).
_MAX_DROPPED_NAMES = 1000


def build_metrics(config: Config, version: str) -> GatewayMetrics:
    """The one metrics registry, sized from the configuration (providers, allowlisted models)."""
    providers = config.providers
    enabled: list[str] = []
    models: set[str] = set()
    for name, provider in (
        ("anthropic", providers.anthropic),
        ("openai", providers.openai),
        ("fireworks", providers.fireworks),
        ("google", providers.google),
    ):
        if provider.access_token:
            enabled.append(name)
        models.update(f"{name}/{model}" for model in provider.allowed_models)
    if providers.sourcegraph_embeddings.access_token:
        enabled.append("sourcegraph")
    models.update(config.embeddings.allowed_models)
    return GatewayMetrics(version=version, providers=enabled, models=models)


class RequestTelemetry:
    def __init__(
        self,
        *,
        tracing: Tracing,
        metrics: GatewayMetrics,
        access_log: AccessLog,
        sentry: SentryReporter | None = None,
        notifier: QuotaNotifier | None = None,
    ) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self.access_log = access_log
        self.sentry = sentry
        self.notifier = notifier
        self.hook_errors = 0
        self._dropped_seen: set[str] = set()

    # -- around the pipeline's awaits -------------------------------------------------

    async def auth(self, record: RequestRecord, lookup: Awaitable[Actor]) -> Actor:
        span = self.tracing.start_child(SPAN_AUTH, record.span)
        try:
            actor = await lookup
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.metrics.auth_result(str(getattr(exc, "source", "") or "none"), _auth_outcome(exc))
            mark_error(span, exc)
            span.end()
            raise
        source = actor.source or "none"
        self.metrics.auth_result(source, "ok")
        if span.is_recording():
            span.set_attribute("matched_source", source)
            span.end()
        return actor

    async def limiter(self, record: RequestRecord, rule: LimitRule, acquire: Awaitable[Decision]) -> Decision:
        feature = _feature_label(rule.feature)
        started = time.monotonic()
        span = self.tracing.start_child(SPAN_LIMITER, record.span)
        try:
            decision = await acquire
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.metrics.limiter_decision(feature, "unavailable", time.monotonic() - started)
            if span.is_recording():
                span.set_attributes(limiter_attributes(rule, None))
            mark_error(span, exc)
            span.end()
            raise
        allowed = decision.allowed
        self.metrics.limiter_decision(feature, "allowed" if allowed else (decision.cause or QUOTA), time.monotonic() - started)
        if span.is_recording():
            span.set_attributes(limiter_attributes(rule, decision))
            span.end()
        return decision

    def upstream_started(self, record: RequestRecord) -> None:
        self.metrics.upstream_started(record.provider, _feature_label(record.feature))

    def upstream_ended(self, record: RequestRecord) -> None:
        self.metrics.upstream_ended(record.provider, _feature_label(record.feature))

    def upstream_attempt(self, record: RequestRecord, attempt: Any) -> None:
        status = attempt.status
        outcome = attempt.outcome
        self.metrics.upstream_attempt(record.provider, str(status) if outcome == "ok" and status else str(outcome))
        span = record.span
        if span is not None and span.is_recording():
            record.attempts.append(attempt)

    def record_event(self, record: RequestRecord, event: Event, recorder: EventRecorder) -> None:
        span = record.span
        if span is None or not span.is_recording():
            recorder.record(event)
            return
        child = self.tracing.start_child(SPAN_EVENT, span, {"source": event.source, "event.name": event.name})
        try:
            recorder.record(event)
        except BaseException as exc:
            mark_error(child, exc)
            child.end()
            raise
        backlog = getattr(recorder, "backlog", None)
        child.set_attribute("event.buffered", backlog is not None)
        if isinstance(backlog, int):
            child.set_attribute("buffer.backlog", backlog)
        child.end()

    def rate_limited(self, record: RequestRecord, decision: Decision) -> None:
        try:
            actor = record.actor
            if self.notifier is not None and actor is not None and decision.cause == QUOTA:
                self.notifier.notify(actor, record.feature or "", 1.0, decision.retry_after_s)
        except Exception:  # telemetry must never fail a request
            self._hook_failed("rate_limited")

    # -- the end ---------------------------------------------------------------------

    def finished(self, record: RequestRecord) -> None:
        try:
            self._finished(record)
        except Exception:  # telemetry must never fail a request
            self._hook_failed("finished")

    def _finished(self, record: RequestRecord) -> None:
        now = time.monotonic()
        metrics = self.metrics
        feature = _feature_label(record.feature)
        model_label = metrics.model_label(record.model)
        upstream_s = record.upstream_seconds(now)
        reached_upstream = upstream_s is not None
        admitted = record.decision is not None
        if admitted or record.input_tokens is not None:
            metrics.observe_tokens(record.provider, model_label, feature, (
                ("input", record.input_tokens), ("output", record.output_tokens),
                ("cache_read", record.cache_read_tokens), ("cache_creation", record.cache_creation_tokens),
                ("reasoning", record.reasoning_tokens),
            ))  # fmt: skip
            if admitted and record.operation != "embeddings":
                self._span_usage(record, feature, model_label, now)
        if record.dropped_fields:
            self._dropped_fields(record)
        if record.traced:
            metrics.fireworks_traced.inc()
        facts = RequestFacts(
            route=record.route,
            status=record.status,
            duration_s=now - record.started_at,
            provider=record.provider,
            feature=feature,
            model=model_label,
            stream=record.stream if reached_upstream else None,
            upstream_s=upstream_s,
            upstream_status=record.upstream_status,
            ttfb_s=record.ttfb_s,
            chunks=record.chunks,
            outcome=(record.outcome.value if record.outcome else "error") if reached_upstream else "",
        )
        metrics.observe_request(facts)
        actor = record.actor
        if self.notifier is not None and actor is not None and record.feature and 200 <= record.status < 300:
            self._notify_usage(record, actor, record.feature)
        if self.access_log.enabled:
            self.access_log.write(self._access_fields(record, facts))
        if self.sentry is not None:
            self.sentry.request_finished(record.span_id, record.status, self._sentry_tags(record, facts))

    def _span_usage(self, record: RequestRecord, feature: str, model_label: str, now: float) -> None:
        span = record.span
        if span is None or not span.is_recording():
            return
        upstream_model = record.upstream_model or (record.model.split("/", 1)[-1] if record.model else None)
        operation = record.operation
        genai = genai_attributes(
            provider=record.provider,
            operation=operation,
            model=upstream_model,
            stream=record.stream,
            max_tokens=record.max_tokens,
            input_tokens=record.input_tokens,
            output_tokens=record.output_tokens,
            cache_read_tokens=record.cache_read_tokens,
            cache_creation_tokens=record.cache_creation_tokens,
            reasoning_tokens=record.reasoning_tokens,
        )
        upstream_status = record.upstream_status
        request_attributes: dict[str, Any] = {
            **genai,
            "feature": feature,
            "model": model_label,
            "upstreamStatusCode": upstream_status if upstream_status is not None else -1,
            "resolvedStatusCode": record.status,
            "outcome": record.outcome.value if record.outcome else "error",
            "chunks": record.chunks,
        }
        if record.ttfb_s is not None:
            request_attributes["time_to_first_byte_ms"] = round(record.ttfb_s * 1000, 3)
        span.set_attributes(request_attributes)
        started = record.upstream_started
        if started is None:
            return
        ended = record.upstream_ended or now
        upstream_attributes = dict(genai)
        upstream_attributes["upstream.provider"] = record.provider
        if upstream_status is not None:
            upstream_attributes["http.response.status_code"] = upstream_status
        attempts = record.attempts
        if len(attempts) == 1:
            # One attempt is the model call itself: its outcome goes on the call's span
            # rather than on a child span covering the same interval.
            upstream_attributes["upstream.outcome"] = str(attempts[0].outcome)
            attempts = []
        upstream_span = self.tracing.past_span(
            span, f"{GENAI_OPERATIONS.get(operation, 'chat')} {upstream_model or ''}".rstrip(),
            started, ended, upstream_attributes, kind=SpanKind.CLIENT,
        )
        for attempt in attempts:
            attributes: dict[str, Any] = {"upstream.outcome": str(attempt.outcome)}
            if attempt.status is not None:
                attributes["http.response.status_code"] = attempt.status
            self.tracing.past_span(
                upstream_span, "POST", attempt.started_at, attempt.ended_at or ended, attributes, kind=SpanKind.CLIENT
            )

    @staticmethod
    def _access_fields(record: RequestRecord, facts: RequestFacts) -> dict[str, Any]:
        actor = record.actor
        duration_s = facts.duration_s
        model = record.model
        fields_: dict[str, Any] = {
            "method": record.method,
            "path": record.path,
            "status": facts.status,
            "duration_ms": round(duration_s * 1000, 3),
            "route": facts.route,
            "actor_id": actor.id if actor is not None else None,
            "actor_source": actor.source if actor is not None else None,
            "feature": record.feature,
            "model": model[:_MAX_TEXT] if model is not None else None,
            "trace_id": record.trace_id,
            "span_id": record.span_id,
            "remote_ip": record.remote_ip,
            "user_agent": record.user_agent,
        }
        if record.interaction_id:
            fields_["interaction_id"] = record.interaction_id
        if facts.provider:
            fields_["provider"] = facts.provider
        upstream_s = facts.upstream_s
        if upstream_s is not None:
            fields_["stream"] = facts.stream
            fields_["upstream_status"] = facts.upstream_status
            fields_["upstream_ms"] = round(upstream_s * 1000, 3)
            fields_["overhead_ms"] = round(max(0.0, duration_s - upstream_s) * 1000, 3)
            fields_["ttfb_ms"] = round(facts.ttfb_s * 1000, 3) if facts.ttfb_s is not None else None
            fields_["chunks"] = facts.chunks
            fields_["outcome"] = facts.outcome
        if record.decision is not None or record.input_tokens is not None:
            fields_["input_tokens"], fields_["output_tokens"] = record.input_tokens, record.output_tokens
        if facts.status >= 400 and record.error:
            # The formatter scrubs secrets from the whole line, this message included.
            fields_["error"] = record.error[:_MAX_TEXT]
        return fields_

    @staticmethod
    def _sentry_tags(record: RequestRecord, facts: RequestFacts) -> dict[str, str]:
        actor = record.actor
        return {
            "actor_id": actor.id if actor is not None else "",
            "actor_source": actor.source if actor is not None else "",
            "trace_id": record.trace_id,
            "span_id": record.span_id,
            "route": facts.route,
            "method": record.method,
            "provider": facts.provider,
            "feature": record.feature or "",
            "model": facts.model if record.model else "",
            "status": str(facts.status),
        }

    def _notify_usage(self, record: RequestRecord, actor: Actor, feature: str) -> None:
        notifier = self.notifier
        decision = record.decision
        if notifier is None or decision is None or decision.limit <= 0:
            return
        notifier.notify(actor, feature, (decision.limit - max(0, decision.remaining)) / decision.limit, decision.reset_s)

    def _dropped_fields(self, record: RequestRecord) -> None:
        """Counted by provider (field names are the client's choice: never a label); each new name logged once."""
        self.metrics.dropped_fields.labels(record.provider).inc()
        seen = self._dropped_seen
        new = [name for name in record.dropped_fields if name not in seen]
        if new and len(seen) < _MAX_DROPPED_NAMES:
            seen.update(new)
            log.info("dropped request fields the gateway does not know (%s): %s", record.provider, ", ".join(new))

    def _hook_failed(self, hook: str) -> None:
        self.hook_errors += 1
        if self.hook_errors <= 10 or self.hook_errors % 1000 == 0:
            log.exception("telemetry hook %s failed (%d so far)", hook, self.hook_errors)

    # -- sampled state ------------------------------------------------------------------

    def install_samplers(self, services: Any) -> None:
        metrics = self.metrics
        metrics.add_sampler(lambda: metrics.in_flight.set(services.in_flight))
        events = services.events
        if callable(getattr(events, "stats", None)):
            metrics.add_sampler(lambda: metrics.sample_event_logger(events))
        stats = getattr(services.actors, "stats", None)
        if stats is not None:
            metrics.add_sampler(lambda: metrics.sample_actor_cache(stats))
        exporter = getattr(services.tracing, "exporter", None)
        if exporter is not None:
            metrics.add_sampler(lambda: metrics.sample_span_export(exporter.stats))
        failover = getattr(getattr(services.limiter, "stats", None), "in_outage", None)
        if failover is not None:
            metrics.add_sampler(lambda: metrics.sample_failover(services.limiter.stats))

        breaker = services.circuit_breaker
        if breaker is not None:

            def circuits() -> None:
                models = breaker.snapshot().get("models", {})
                metrics.sample_circuits({m: state.get("state") == "open" for m, state in models.items()})

            metrics.add_sampler(circuits)


def build_request_telemetry(
    services: Any,
    *,
    metrics: GatewayMetrics | None = None,
    http_client: Any | None = None,
    redis: Any | None = None,
) -> RequestTelemetry:
    """Build metrics, request logs, Sentry and quota notifications, and make them the services' observer.

    ``redis`` (a redis.asyncio client, or None) holds the notification locks
    and dedup keys; ``http_client`` posts to Slack. Call it from inside the
    running event loop.
    """
    config: Config = services.config
    telemetry = config.telemetry
    scrubber = add_secrets_to_log_scrubbing(config_secrets(config))
    metrics = metrics or build_metrics(config, services.version)
    sentry = None
    if telemetry.sentry_dsn:
        sentry = SentryReporter(
            telemetry.sentry_dsn, environment=config.environment, release=services.version, scrubber=scrubber
        )
        sentry.start()
        log.info("Sentry reporting is on")
    notifier = None
    if any(telemetry.notify_thresholds.values()):
        notifier = QuotaNotifier(
            thresholds=telemetry.notify_thresholds,
            webhook_url=telemetry.slack_webhook_url,
            dotcom_api_url=config.actors.dotcom_api_url,
            redis=redis,
            http_client=http_client,
            on_redis_call=metrics.redis_call,
            on_outcome=metrics.notification,
        )
    request_telemetry = RequestTelemetry(
        tracing=services.tracing,
        metrics=metrics,
        access_log=AccessLog(enabled=telemetry.access_log),
        sentry=sentry,
        notifier=notifier,
    )
    request_telemetry.install_samplers(services)
    services.observer = request_telemetry
    services.metrics = metrics

    periodic = None
    if metrics.multiproc_dir:
        # Another worker may answer the scrape: keep this one's gauges fresh.
        from tornado.ioloop import PeriodicCallback

        periodic = PeriodicCallback(metrics.sample, _SAMPLE_INTERVAL_MS)
        periodic.start()

    async def shutdown() -> None:
        if periodic is not None:
            periodic.stop()
        if notifier is not None:
            await notifier.wait_idle(timeout_s=5.0)
        if sentry is not None:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, sentry.close)

    services.shutdown_hooks.append(shutdown)
    return request_telemetry


def _feature_label(feature: str | None) -> str:
    if not feature:
        return ""
    return feature if feature in FEATURES else OTHER


def _auth_outcome(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return {400: "invalid", 401: "denied", 403: "forbidden", 503: "unavailable"}.get(status, "error")  # type: ignore[arg-type]
