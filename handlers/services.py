"""Everything handlers depend on, built once by the composition root and injected via initialize()."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from actors.chain import SourceChain
from conf.model import Config
from handlers.client_address import TrustedProxies
from handlers.guess_throttle import GuessThrottle
from handlers.leases import LeaseKeeper
from limiter.base import Limiter
from telemetry.record import NULL_OBSERVER, RequestObserver
from telemetry.tracing import Tracing
from upstreams.retry import RetryPolicy
from upstreams.transport import Transport
from usage.events import EventRecorder
from usage.refusal_sampling import RefusalSampler

if TYPE_CHECKING:
    from abuse.screening import Screening
    from telemetry.metrics import GatewayMetrics
    from upstreams.circuit import CircuitBreaker

VERSION = "0.1.0"

HealthProbe = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class Services:
    config: Config
    actors: SourceChain
    limiter: Limiter
    events: EventRecorder
    transport: Transport
    tracing: Tracing
    # Completions and OpenAI embeddings (upstreams/retry.py).
    retry_policy: RetryPolicy
    # Renews the leases of requests that run longer than a third of upstream.lease_ttl_s.
    leases: LeaseKeeper
    # At most one RateLimited event per actor, feature and cause per window.
    refusals: RefusalSampler = field(default_factory=RefusalSampler)
    # Failed guesses of the diagnostics secret, per client address.
    guess_throttle: GuessThrottle = field(default_factory=GuessThrottle)
    # Whose X-Forwarded-For / Cf-Connecting-Ip is believed (server.trusted_proxies).
    trusted_proxies: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    version: str = VERSION
    observer: RequestObserver = NULL_OBSERVER
    # /-/healthz's report: one probe per part (event sink, Redis, circuits).
    health_probes: dict[str, HealthProbe] = field(default_factory=dict)
    # Abuse flagging of completion requests (None: nothing is screened).
    screening: Screening | None = None
    circuit_breaker: CircuitBreaker | None = None
    # The Prometheus registry behind /metrics (None: /metrics answers 404).
    metrics: GatewayMetrics | None = None
    # Run at shutdown, in order, before the event logger and the limiter close.
    shutdown_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Live requests, for the SIGTERM drain.
    in_flight: int = 0
    # Readiness (/-/readyz): set once the server listens; ``draining`` wins from SIGTERM on.
    ready: bool = False
    draining: bool = False
