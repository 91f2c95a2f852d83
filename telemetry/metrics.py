"""Prometheus metrics: every series the gateway exposes, defined once, in one registry.

Names follow Prometheus conventions (``cody_gateway_`` prefix, base units in
the name, ``_total`` counters); every label has a small, known set of values:
route class, provider, feature, status code, outcome, and models only from
the configured allowlists (anything else is ``other``). Never an actor id.

Hot path: a request costs a handful of pre-resolved child updates at its end
(``observe_request``); nothing is updated per streamed chunk. Numbers that
other parts already keep (event logger counters, actor cache hits, failover
state, in-flight requests, circuit breaker state) are copied in by
``sample()``, which runs before every scrape and, in multi-process mode,
every few seconds in each worker.

Multi-process mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``gateway.py
--processes N`` sets it before forking), values live in that directory and a
scrape of any worker aggregates all of them. The variable must be set before
the first metric is created in the process; ``GatewayMetrics`` checks it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    values,
)
from prometheus_client.exposition import choose_encoder

PREFIX = "cody_gateway_"
FEATURES = ("code_completions", "chat_completions", "embeddings")
OTHER = "other"

# Whole-request latency: streams last seconds to minutes.
# Bucket edges are the ones the dashboards and alerts (conf/) read a quantile or a
# threshold near; each edge costs one series per label combination.
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Time to first byte and upstream calls.
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# Our own overhead (total minus upstream): sub-millisecond is the goal; the alert is at 50 ms.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# Redis round trips and limiter decisions.
REDIS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

LIMITER_OUTCOMES = ("allowed", "quota", "concurrency", "tokens", "unavailable")
COMPLETION_OUTCOMES = ("complete", "client_disconnected", "upstream_error", "error")
# "rejected" (rows the sink refused for good, set aside) is a loss path and is alerted on.
EVENT_OUTCOMES = (
    "queued", "delivered", "retried", "spilled", "replayed", "dropped",
    "rejected", "unidentified", "coerced", "journal_error",
)
NOTIFY_OUTCOMES = ("sent", "failed", "logged")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None  # noqa: SIM112 - prometheus_client also reads the lowercase name


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (call from the supervising parent after ``os.wait``)."""
    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


@dataclass(slots=True)
class RequestFacts:
    """What one finished request tells the metrics, read once from the handler."""

    route: str
    status: int
    duration_s: float
    provider: str = ""
    feature: str = ""
    model: str = OTHER
    stream: bool | None = None
    upstream_s: float | None = None
    upstream_status: int | None = None
    ttfb_s: float | None = None
    chunks: int = 0
    outcome: str = ""


class _CounterFeed:
    """Feeds a Prometheus counter from a cumulative number kept elsewhere."""

    __slots__ = ("child", "last")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.last: float = 0

    def update(self, value: int | float) -> None:
        delta = value - self.last
        if delta > 0:
            self.child.inc(delta)
        # A smaller value means the source restarted its count.
        self.last = value


class GatewayMetrics:
    def __init__(
        self,
        *,
        version: str,
        providers: Sequence[str] = (),
        models: Iterable[str] = (),
        multiproc_dir: str | None = None,
    ) -> None:
        self.multiproc_dir = multiproc_dir if multiproc_dir is not None else multiprocess_dir()
        if self.multiproc_dir and values.ValueClass is values.MutexValue:
            # prometheus-client picks its value storage when imported; the
            # directory may have been set after that (a forked worker).
            values.ValueClass = values.MultiProcessValue()
        # ``_created`` series double the scrape for nothing Prometheus uses.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.providers = tuple(providers)
        self.models = frozenset(models)
        self._samplers: list[Callable[[], None]] = []
        reg = self.registry
        mp = bool(self.multiproc_dir)

        # -- HTTP ------------------------------------------------------------
        self.requests = Counter(
            PREFIX + "http_requests", "Requests answered, by route class, provider and status code.",
            ("route", "provider", "code"), registry=reg,
        )
        self.request_duration = Histogram(
            PREFIX + "http_request_duration_seconds", "Time from accepting a request to its last byte.",
            ("route", "provider", "code_class"), buckets=REQUEST_BUCKETS, registry=reg,
        )
        self.in_flight = Gauge(
            PREFIX + "http_requests_in_flight", "Requests being served.", registry=reg, multiprocess_mode="livesum",
        )
        # -- upstream ----------------------------------------------------------
        self.concurrent_upstream = Gauge(
            PREFIX + "concurrent_upstream_requests", "Requests currently calling an upstream provider.",
            ("provider", "feature"), registry=reg, multiprocess_mode="livesum",
        )
        self.upstream_duration = Histogram(
            PREFIX + "upstream_request_duration_seconds", "Upstream call time, retries included, to the last byte relayed.",
            ("provider", "feature", "stream"), buckets=UPSTREAM_BUCKETS, registry=reg,
        )
        self.upstream_responses = Counter(
            PREFIX + "upstream_responses", "Final upstream result per request: status code, or 'none' without a response.",
            ("provider", "code"), registry=reg,
        )
        self.upstream_attempts = Counter(
            PREFIX + "upstream_attempts", "Every upstream attempt (retries included) by result.",
            ("provider", "result"), registry=reg,
        )
        self.ttfb = Histogram(
            PREFIX + "time_to_first_byte_seconds", "Time from accepting a request to relaying the first body byte.",
            ("provider", "feature", "stream"), buckets=UPSTREAM_BUCKETS, registry=reg,
        )
        self.overhead = Histogram(
            PREFIX + "latency_overhead_seconds", "Gateway overhead: total request time minus upstream time.",
            ("provider", "feature", "stream"), buckets=OVERHEAD_BUCKETS, registry=reg,
        )
        self.stream_chunks = Counter(
            PREFIX + "stream_chunks", "Upstream body chunks relayed to clients.",
            ("provider", "feature"), registry=reg,
        )
        self.completions = Counter(
            PREFIX + "completions", "Completion and embedding requests that reached the upstream, by outcome.",
            ("provider", "feature", "stream", "outcome"), registry=reg,
        )
        self.tokens = Counter(
            PREFIX + "tokens",
            "Tokens counted in usage events, by kind: input and output are the totals; cache_read and "
            "cache_creation are parts of input, reasoning a part of output.",
            ("provider", "model", "feature", "kind"), registry=reg,
        )
        self.dropped_fields = Counter(
            PREFIX + "dropped_request_fields", "Requests with top-level fields the gateway does not know (dropped, not forwarded).",
            ("provider",), registry=reg,
        )
        self.fireworks_traced = Counter(
            PREFIX + "fireworks_traced_requests", "Fireworks requests sent with X-Fireworks-Genie (the reference's traced requests).",
            registry=reg,
        )
        # -- auth and limits ----------------------------------------------------
        self.auth = Counter(
            PREFIX + "auth_requests", "Token lookups by deciding source and outcome.",
            ("source", "outcome"), registry=reg,
        )
        self.trace_spans = Counter(
            PREFIX + "trace_spans", "Spans handed to the OTLP exporter, by outcome (exported, dropped, failed).",
            ("outcome",), registry=reg,
        )
        self.actor_cache = Counter(
            PREFIX + "actor_cache_lookups", "In-process actor cache lookups.", ("result",), registry=reg,
        )
        self.limiter_decisions = Counter(
            PREFIX + "limiter_decisions", "Limiter admissions by feature and outcome.",
            ("feature", "outcome"), registry=reg,
        )
        self.limiter_duration = Histogram(
            PREFIX + "limiter_duration_seconds", "Time to get a limiter decision.",
            buckets=REDIS_BUCKETS, registry=reg,
        )
        self.redis_duration = Histogram(
            PREFIX + "redis_command_duration_seconds", "Redis round trips by command and outcome (ok, error, timeout).",
            ("command", "outcome"), buckets=REDIS_BUCKETS, registry=reg,
        )
        self.redis_errors = Counter(
            PREFIX + "redis_errors", "Redis calls that failed or timed out.", ("command", "kind"), registry=reg,
        )
        self.redis_up = Gauge(
            PREFIX + "limiter_redis_up", "1 while the Redis limiter answers, 0 during an outage.",
            registry=reg, multiprocess_mode="livemin",
        )
        self.redis_outages = Counter(PREFIX + "limiter_redis_outages", "Redis limiter outages started.", registry=reg)
        self.fallback_decisions = Counter(
            PREFIX + "limiter_fallback_decisions", "Decisions made by the in-process fallback during Redis outages.",
            registry=reg,
        )
        self.pending_releases = Gauge(
            PREFIX + "limiter_pending_releases", "Limiter releases waiting for Redis to come back.",
            registry=reg, multiprocess_mode="livesum",
        )
        # -- events -------------------------------------------------------------
        self.event_backlog = Gauge(
            PREFIX + "event_buffer_backlog", "Usage events accepted but not yet delivered or spilled.",
            registry=reg, multiprocess_mode="livesum",
        )
        self.events = Counter(
            PREFIX + "events", "Usage events by outcome (queued, delivered, retried, spilled, replayed, dropped).",
            ("outcome",), registry=reg,
        )
        self.event_flush_failures = Counter(
            PREFIX + "event_sink_flush_failures", "Failed writes of an event batch to the sink.", registry=reg,
        )
        self.event_spill_pending = Gauge(
            PREFIX + "event_spill_files_pending", "Spill files and journal segments waiting to be replayed.",
            registry=reg, multiprocess_mode="livesum",
        )
        self.event_sink_up = Gauge(
            PREFIX + "event_sink_up", "1 while the event sink's last flush succeeded.",
            registry=reg, multiprocess_mode="livemin",
        )
        # -- circuit breaker, notifications, build ------------------------------
        self.circuit_open = Gauge(
            PREFIX + "circuit_breaker_open", "1 while a model's circuit breaker refuses requests.",
            ("model",), registry=reg, multiprocess_mode="livemax",
        )
        self.notifications = Counter(
            PREFIX + "quota_notifications", "Quota usage notifications by outcome (sent, failed, logged).",
            ("outcome",), registry=reg,
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "Always 1; the version as a label.", ("version",),
            registry=reg, multiprocess_mode="livemax",
        )
        self.build_info.labels(version).set(1)
        if not mp:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

        self._feeds: dict[tuple[str, ...], _CounterFeed] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        self._bundles: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._precreate()

    # -- children --------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _precreate(self) -> None:
        """Series that alerts and dashboards divide by exist (at 0) from the start."""
        for feature in FEATURES:
            for outcome in LIMITER_OUTCOMES:
                self._child(self.limiter_decisions, feature, outcome)
        for outcome in EVENT_OUTCOMES:
            self._child(self.events, outcome)
        for outcome in NOTIFY_OUTCOMES:
            self._child(self.notifications, outcome)
        for result in ("hit", "miss"):
            self._child(self.actor_cache, result)
        for provider in self.providers:
            for feature in FEATURES:
                self._child(self.concurrent_upstream, provider, feature)
                self._child(self.stream_chunks, provider, feature)
                # Histograms are not created ahead: every provider x feature x stream
                # combination at 0 was 1,500 of the 1,800 samples of a scrape, for
                # series nobody divides by; they appear with their first request.

    def model_label(self, model: str | None) -> str:
        """The model as a label value: only allowlisted ``provider/model`` names, else ``other``."""
        return model if model in self.models else OTHER

    # -- per request ------------------------------------------------------------

    def observe_request(self, facts: RequestFacts) -> None:
        # One lookup finds every child this kind of request updates.
        key = (facts.route, facts.provider, facts.status, facts.feature, facts.stream, facts.upstream_status,
               facts.outcome, facts.upstream_s is None)
        bundle = self._bundles.get(key)
        if bundle is None:
            bundle = self._bundles[key] = self._bundle(facts)
        bundle[0].inc()
        bundle[1].observe(facts.duration_s)
        if facts.upstream_s is None:
            return
        bundle[2].observe(facts.upstream_s)
        bundle[3].observe(max(0.0, facts.duration_s - facts.upstream_s))
        bundle[4].inc()
        if facts.ttfb_s is not None:
            bundle[5].observe(facts.ttfb_s)
        if facts.chunks:
            bundle[6].inc(facts.chunks)
        if bundle[7] is not None:
            bundle[7].inc()

    def _bundle(self, facts: RequestFacts) -> tuple[Any, ...]:
        route, provider, status = facts.route, facts.provider, facts.status
        children: list[Any] = [
            self._child(self.requests, route, provider, str(status)),
            self._child(self.request_duration, route, provider, f"{status // 100}xx"),
        ]
        if facts.upstream_s is None:
            return tuple(children)
        feature = facts.feature
        stream = "true" if facts.stream else "false"
        code = str(facts.upstream_status) if facts.upstream_status is not None else "none"
        children += [
            self._child(self.upstream_duration, provider, feature, stream),
            self._child(self.overhead, provider, feature, stream),
            self._child(self.upstream_responses, provider, code),
            self._child(self.ttfb, provider, feature, stream),
            self._child(self.stream_chunks, provider, feature),
            self._child(self.completions, provider, feature, stream, facts.outcome) if facts.outcome else None,
        ]
        return tuple(children)

    def observe_tokens(self, provider: str, model: str, feature: str, counts: Iterable[tuple[str, int | None]]) -> None:
        """``counts``: (kind, tokens) pairs; unknown and zero counts add nothing."""
        for kind, tokens in counts:
            if tokens:
                self._child(self.tokens, provider, model, feature, kind).inc(tokens)

    def upstream_started(self, provider: str, feature: str) -> None:
        self._child(self.concurrent_upstream, provider, feature).inc()

    def upstream_ended(self, provider: str, feature: str) -> None:
        self._child(self.concurrent_upstream, provider, feature).dec()

    def upstream_attempt(self, provider: str, result: str) -> None:
        self._child(self.upstream_attempts, provider, result).inc()

    def limiter_decision(self, feature: str, outcome: str, seconds: float | None = None) -> None:
        self._child(self.limiter_decisions, feature, outcome).inc()
        if seconds is not None:
            self.limiter_duration.observe(seconds)

    def auth_result(self, source: str, outcome: str) -> None:
        self._child(self.auth, source, outcome).inc()

    def redis_call(self, command: str, seconds: float, outcome: str) -> None:
        """A Redis round trip; matches limiter.failover's ``CallObserver`` (op, seconds, outcome)."""
        self._child(self.redis_duration, command, outcome).observe(seconds)
        if outcome != "ok":
            self._child(self.redis_errors, command, outcome).inc()

    def notification(self, outcome: str) -> None:
        self._child(self.notifications, outcome).inc()

    # -- sampled state ------------------------------------------------------------

    def add_sampler(self, sampler: Callable[[], None]) -> None:
        self._samplers.append(sampler)

    def feed_counter(self, metric: Any, labels: tuple[str, ...], value: int | float) -> None:
        key = (str(id(metric)), *labels)
        feed = self._feeds.get(key)
        if feed is None:
            feed = self._feeds[key] = _CounterFeed(metric.labels(*labels) if labels else metric)
        feed.update(value)

    def sample(self) -> None:
        for sampler in self._samplers:
            sampler()

    def sample_event_logger(self, logger: Any) -> None:
        """Copy an EventLogger's counters and gauges (duck-typed: ``stats()``, ``healthy``)."""
        stats = logger.stats()
        for outcome in EVENT_OUTCOMES:
            key = "journal_errors" if outcome == "journal_error" else outcome
            self.feed_counter(self.events, (outcome,), stats.get(key, 0))
        self.feed_counter(self.event_flush_failures, (), stats.get("flush_failures", 0))
        self.event_backlog.set(stats.get("backlog", 0))
        self.event_spill_pending.set(stats.get("pending_replay", 0))
        self.event_sink_up.set(1 if getattr(logger, "healthy", True) else 0)

    def sample_span_export(self, stats: Any) -> None:
        for outcome in ("exported", "dropped", "failed"):
            self.feed_counter(self.trace_spans, (outcome,), getattr(stats, outcome))

    def sample_actor_cache(self, stats: Any) -> None:
        self.feed_counter(self.actor_cache, ("hit",), stats.hits)
        self.feed_counter(self.actor_cache, ("miss",), stats.misses)

    def sample_failover(self, stats: Any) -> None:
        """Copy a FailoverLimiter's ``FailoverStats``."""
        self.redis_up.set(0 if stats.in_outage else 1)
        self.feed_counter(self.redis_outages, (), stats.outages)
        self.feed_counter(self.fallback_decisions, (), stats.fallback_decisions)
        self.pending_releases.set(stats.pending_releases)

    def sample_circuits(self, open_by_model: dict[str, bool]) -> None:
        for model, is_open in open_by_model.items():
            label = self.model_label(model)
            if label != OTHER:
                self._child(self.circuit_open, label).set(1 if is_open else 0)

    # -- exposition ----------------------------------------------------------------

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when the scraper asks for it).

        In multi-process mode this reads every worker's files: call it in an
        executor, after ``sample()`` ran on the event loop.
        """
        encoder, content_type = choose_encoder(accept or "")
        if self.multiproc_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry(auto_describe=False)
            multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
            return encoder(registry), content_type
        return encoder(self.registry), content_type
