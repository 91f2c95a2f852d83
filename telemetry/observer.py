"""The instrumentation points handlers call, and a base that does nothing.

Handlers hold an ``Observer`` (``services.observe``) and call it at a few
points of a request; ``telemetry.observability.Observability`` fills these in
with metrics, spans, logs, Sentry and quota notifications. The wrappers take
the awaitable the handler already had, so instrumenting a call is a change
of one line, e.g.::

    decision = await self.services.observe.limiter(self, rule, self.limited.acquire(rule, ...))

This module imports nothing heavy, so the handlers' core can depend on it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Observer:
    """No telemetry: every wrapper just awaits what it is given."""

    async def auth(self, handler: Any, lookup: Awaitable[T]) -> T:
        """Around the actor lookup (``services.actors.get(token)``)."""
        return await lookup

    async def limiter(self, handler: Any, rule: Any, acquire: Awaitable[T]) -> T:
        """Around the limiter admission; the awaitable returns a ``Decision``."""
        return await acquire

    async def upstream(self, handler: Any, relay: Awaitable[T]) -> T:
        """Around the whole upstream call (all attempts and the relay)."""
        return await relay

    def upstream_attempt(self, handler: Any, attempt: Any) -> None:
        """After each upstream attempt (``upstreams.transport.Attempt``), retries included."""

    def record_event(self, handler: Any, event: Any, recorder: Any) -> None:
        """Record a usage event through ``recorder`` (``services.events``)."""
        recorder.record(event)

    def rate_limited(self, handler: Any, decision: Any) -> None:
        """A limiter rejection (429)."""

    def completion_finished(self, handler: Any, usage: Any) -> None:
        """The usage of a completion or embedding request, before its span ends."""

    def request_finished(self, handler: Any, status: int, duration_s: float) -> None:
        """Every request, once, after its response ended."""


NULL_OBSERVER = Observer()
