"""Model-availability circuit breaker (reference 4.11), in memory, one per process.

The breaker is shared by every actor, so it must hear about the upstream's
health only: nothing one client can cause -- its own short deadline, its
disconnect, a malformed request -- may take a model away from the others
(SPEC point 14). ``health_signal`` is that policy, in one pure function: each
upstream attempt of a model (``provider/model``) is healthy, a failure, or
says nothing (not recorded at all). A model is unavailable while, among its
recent records (the last ``circuit_window`` attempts, of which only those
younger than ``circuit_window_s`` count), failures make up at least
``circuit_failure_ratio`` -- but only once there are ``circuit_min_samples``
such records (SPEC point 8: one lone 500 must not take a model down).
Requests the breaker refuses are not recorded, so a model recovers as its
failures age out of the window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from conf.model import UpstreamConfig
from upstreams.transport import Outcome

# The reference's failure statuses; only for ``record`` given a bare status (legacy callers).
FAILURE_CODES = frozenset({0, 429, 500, 504})
# Outcomes where the upstream failed to answer properly, whoever asked.
_UPSTREAM_FAILURES = frozenset({Outcome.CONNECT_ERROR, Outcome.RESET, Outcome.STALL, Outcome.REJECTED, Outcome.ERROR})
# Models come from allowlists, so this never binds in practice; it only
# bounds memory if a misconfiguration lets arbitrary names through.
MAX_MODELS = 10_000


def health_signal(outcome: str, status: int | None, *, deadline_is_clients: bool) -> bool | None:
    """What one upstream attempt says about the upstream's health.

    True: healthy; False: a failure; None: nothing (the attempt is not
    recorded). ``outcome`` is the attempt's ``transport.Outcome``; ``status``
    the upstream's HTTP status when it answered; ``deadline_is_clients`` is
    true when the request's deadline was the client's choice (an
    ``X-Timeout-Ms`` shorter than the gateway's default), not the gateway's.

    * The upstream answered: 2xx is healthy and 5xx a failure. A 4xx says
      nothing: 400/404/413/422 are the request's fault (one client sending
      malformed requests must not take the model away), 401/403 concern our
      key, not the model, and 429 is the provider's quota for our key (it
      is already answered as 503 with the provider's Retry-After; opening
      the circuit would only stretch that refusal to the breaker's window
      and let one actor burning the shared quota refuse everyone for longer).
      Anything else (1xx, 3xx that was not refused) says nothing either.
    * Connect errors, resets, stalls (the gateway's stall timeout), broken or
      refused responses (a redirect, a compressed or non-SSE body, the wrong
      content type) and unclassified transfer errors are failures.
    * A timeout is a failure only against the gateway's own deadline.
    * The client leaving (or reading too slowly) says nothing.
    """
    if outcome == Outcome.OK:
        if status is None:
            return None
        if 200 <= status < 300:
            return True
        if 500 <= status < 600:
            return False
        return None
    if outcome == Outcome.TIMEOUT:
        return None if deadline_is_clients else False
    if outcome in _UPSTREAM_FAILURES:
        return False
    return None  # CLIENT_GONE, or an outcome this policy does not know


class CircuitBreaker:
    def __init__(self, config: UpstreamConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = max(1, config.circuit_window)
        self._window_s = config.circuit_window_s
        self._ratio = config.circuit_failure_ratio
        self._min_samples = max(1, config.circuit_min_samples)
        self._clock = clock
        # model -> its recent records, oldest first, with running counts.
        self._records: dict[str, _Window] = {}

    def record_attempt(self, model: str, outcome: str, status: int | None, *, deadline_is_clients: bool) -> None:
        """Record one upstream attempt, as ``health_signal`` judges it."""
        self.record(model, health_signal(outcome, status, deadline_is_clients=deadline_is_clients))

    def record(self, model: str, healthy: bool | int | None) -> None:
        """Record one attempt: True healthy, False a failure, None nothing (not recorded).

        A bare HTTP status (an ``int`` that is not a ``bool``) is the older
        form, judged by the reference's ``FAILURE_CODES``; it remains until
        every caller goes through ``health_signal``.
        """
        if healthy is None:
            return
        if isinstance(healthy, bool):
            failed = not healthy
        else:
            failed = healthy in FAILURE_CODES
        window = self._records.get(model)
        if window is None:
            if len(self._records) >= MAX_MODELS:
                self._records.pop(next(iter(self._records)))
            window = self._records[model] = _Window()
        now = self._clock()
        window.expire(now - self._window_s)
        if len(window.records) >= self._capacity:
            window.drop_oldest()
        window.records.append((now, failed))
        window.failures += failed

    def _recent(self, model: str) -> tuple[int, int]:
        """(records in the window, failures among them)."""
        window = self._records.get(model)
        if window is None:
            return 0, 0
        window.expire(self._clock() - self._window_s)
        return len(window.records), window.failures

    def available(self, model: str) -> bool:
        total, failures = self._recent(model)
        if total < self._min_samples:
            return True
        return failures / total < self._ratio

    def snapshot(self) -> dict[str, Any]:
        """Every model seen, with its state: what /-/healthz reports."""
        models: dict[str, Any] = {}
        for model in list(self._records):
            total, failures = self._recent(model)
            models[model] = {
                "state": "closed" if self.available(model) else "open",
                "recent_attempts": total,
                "recent_failures": failures,
                "failure_ratio": round(failures / total, 4) if total else 0.0,
            }
        return {
            "window": self._capacity,
            "window_s": self._window_s,
            "failure_ratio_threshold": self._ratio,
            "min_samples": self._min_samples,
            "models": models,
        }

    async def health_probe(self) -> dict[str, Any]:
        """For ``health_probes``: an open circuit is the provider's trouble, not ours,
        so it is reported without making the gateway unhealthy."""
        snapshot = self.snapshot()
        snapshot["open"] = sorted(m for m, s in snapshot["models"].items() if s["state"] == "open")
        snapshot["ok"] = True
        return snapshot


class _Window:
    """One model's recent records, oldest first, and how many of them are failures.

    Kept as running counts so that ``available`` (asked on every request) costs
    the same whatever the window's size: records leave from the old end.
    """

    __slots__ = ("records", "failures")

    def __init__(self) -> None:
        self.records: deque[tuple[float, bool]] = deque()
        self.failures = 0

    def drop_oldest(self) -> None:
        _, failed = self.records.popleft()
        self.failures -= failed

    def expire(self, cutoff: float) -> None:
        records = self.records
        while records and records[0][0] < cutoff:
            self.drop_oldest()
