"""One typed record per request, and the one observer interface that reads it.

Handlers fill a ``RequestRecord`` as the request goes (who, what, which
upstream, how it went); the usage event, the metrics, the span attributes
and the access line are all built from it, through ``RequestObserver``. No
telemetry module reads a handler: a renamed handler attribute cannot make a
metric silently read a default, because there is none to read.

This module imports nothing heavy, so handlers can depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from actors.model import Actor
    from limiter.base import Decision, LimitRule
    from usage.events import Event, EventRecorder



class Outcome(enum.StrEnum):
    """How a request that reached an upstream ended (the usage event's ``outcome``)."""

    COMPLETE = "complete"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_ERROR = "upstream_error"
    ERROR = "error"
    CLIENT_TOO_SLOW = "client_too_slow"


class RequestRecord:
    """What happened to one request; filled by its handler, read by the observer.

    ``outcome`` stays None until an upstream was asked; ``upstream_started``
    is None when none was. Token counts are ``int | None`` (None: not known).
    """

    __slots__ = (
        "route", "operation", "method", "path", "remote_ip", "user_agent", "started_at",
        "actor_uid", "anonymous_uid", "interaction_id",
        "span", "trace_id", "span_id",
        "actor", "feature", "provider", "model", "upstream_model", "stream", "max_tokens",
        "decision", "attempts", "upstream_started", "upstream_ended", "upstream_status",
        "ttfb_s", "chunks", "outcome",
        "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "reasoning_tokens",
        "dropped_fields", "traced",
        "status", "error",
    )  # fmt: skip

    def __init__(self, route: str, operation: str, method: str, path: str, remote_ip: str, user_agent: str, started_at: float) -> None:
        self.route = route
        self.operation = operation
        self.method = method
        self.path = path
        self.remote_ip = remote_ip
        self.user_agent = user_agent
        self.started_at = started_at
        # The end user behind the calling instance and the client's interaction, as the
        # client sent them (bounded by the handler): X-Sourcegraph-Actor-UID, -Anonymous-UID,
        # X-Sourcegraph-Interaction-ID.
        self.actor_uid = ""
        self.anonymous_uid = ""
        self.interaction_id = ""
        self.span: Span | None = None
        self.trace_id = ""
        self.span_id = ""
        self.actor: Actor | None = None
        self.feature: str | None = None
        self.provider = ""
        # ``provider/model`` once resolved; ``upstream_model`` is the provider's own name for it.
        self.model: str | None = None
        self.upstream_model: str | None = None
        self.stream: bool | None = None
        self.max_tokens: int | None = None
        self.decision: Decision | None = None
        self.attempts: list[Any] = []
        self.upstream_started: float | None = None
        self.upstream_ended: float | None = None
        self.upstream_status: int | None = None
        self.ttfb_s: float | None = None
        self.chunks = 0
        self.outcome: Outcome | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.cache_read_tokens: int | None = None
        self.cache_creation_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        # Top-level request fields the provider module did not know (dropped), and
        # whether the call was a traced one (Fireworks' X-Fireworks-Genie).
        self.dropped_fields: tuple[str, ...] = ()
        self.traced = False
        self.status = 200
        self.error: str | None = None

    def upstream_seconds(self, now: float) -> float | None:
        started = self.upstream_started
        if started is None:
            return None
        return (self.upstream_ended or now) - started


class RequestObserver(Protocol):
    """The instrumentation points of a request. ``auth`` and ``limiter`` take the
    awaitable the handler already had and time it; the upstream exchange is
    bracketed by two plain calls instead, so that a long relay is not one more
    coroutine frame held per open stream."""

    async def auth(self, record: RequestRecord, lookup: Awaitable[Actor]) -> Actor: ...

    async def limiter(self, record: RequestRecord, rule: LimitRule, acquire: Awaitable[Decision]) -> Decision: ...

    def upstream_started(self, record: RequestRecord) -> None:
        """The request is handed to its provider (attempts and relay follow)."""
        ...

    def upstream_ended(self, record: RequestRecord) -> None:
        """The provider exchange is over, however it ended (called exactly once after ``upstream_started``)."""
        ...

    def upstream_attempt(self, record: RequestRecord, attempt: Any) -> None: ...

    def record_event(self, record: RequestRecord, event: Event, recorder: EventRecorder) -> None: ...

    def rate_limited(self, record: RequestRecord, decision: Decision) -> None: ...

    def finished(self, record: RequestRecord) -> None:
        """Once per request, after its response ended and before its span ends."""
        ...


class NullObserver:
    """No telemetry: every wrapper just awaits what it is given."""

    async def auth(self, record: RequestRecord, lookup: Awaitable[Actor]) -> Actor:
        return await lookup

    async def limiter(self, record: RequestRecord, rule: LimitRule, acquire: Awaitable[Decision]) -> Decision:
        return await acquire

    def upstream_started(self, record: RequestRecord) -> None:
        pass

    def upstream_ended(self, record: RequestRecord) -> None:
        pass

    def upstream_attempt(self, record: RequestRecord, attempt: Any) -> None:
        pass

    def record_event(self, record: RequestRecord, event: Event, recorder: EventRecorder) -> None:
        recorder.record(event)

    def rate_limited(self, record: RequestRecord, decision: Decision) -> None:
        pass

    def finished(self, record: RequestRecord) -> None:
        pass


NULL_OBSERVER = NullObserver()
