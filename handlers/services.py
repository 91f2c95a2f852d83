"""Everything handlers depend on, built once in gateway.main() and injected via initialize()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actors.chain import SourceChain
from conf.model import Config
from limiter.base import Limiter
from usage.events import EventRecorder
from telemetry.observer import NULL_OBSERVER, Observer
from telemetry.tracing import Tracing
from upstreams.transport import Transport

VERSION = "0.1.0"


@dataclass(slots=True)
class Services:
    config: Config
    actors: SourceChain
    limiter: Limiter
    events: EventRecorder
    transport: Transport
    tracing: Tracing
    version: str = VERSION
    observe: Observer = NULL_OBSERVER
    # Optional parts that later layers attach (health probes of Redis and sinks,
    # circuit breakers, metrics); looked up by name so the core does not import them.
    extras: dict[str, Any] = field(default_factory=dict)
    # Live requests, for the SIGTERM drain.
    in_flight: int = 0
    # Readiness (/-/readyz): set once the server listens, cleared by nothing;
    # ``draining`` takes precedence from SIGTERM on.
    ready: bool = False
    draining: bool = False
