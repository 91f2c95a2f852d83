"""Model-availability circuit breaker (reference 4.11), in memory, one per process.

Every upstream attempt of a model (``provider/model``) is recorded with its
status: the HTTP status, 504 for a timeout or stall, 0 for a transfer that
failed without a response (connect error, reset). Failures are 429, 500,
504 and 0. A model is unavailable while, among its recent records (the last
``circuit_window`` attempts, of which only those younger than
``circuit_window_s`` count), failures make up at least
``circuit_failure_ratio`` -- but only once there are ``circuit_min_samples``
such records (SPEC point 8: one lone 500 must not take a model down).
Rejected requests are not recorded, so a model recovers as its failures age
out of the window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from conf.model import UpstreamConfig

FAILURE_CODES = frozenset({0, 429, 500, 504})
# Models come from allowlists, so this never binds in practice; it only
# bounds memory if a misconfiguration lets arbitrary names through.
MAX_MODELS = 10_000


class CircuitBreaker:
    def __init__(self, config: UpstreamConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = max(1, config.circuit_window)
        self._window_s = config.circuit_window_s
        self._ratio = config.circuit_failure_ratio
        self._min_samples = max(1, config.circuit_min_samples)
        self._clock = clock
        # model -> (time, is_failure) records, oldest first.
        self._records: dict[str, deque[tuple[float, bool]]] = {}

    def record(self, model: str, status: int) -> None:
        records = self._records.get(model)
        if records is None:
            if len(self._records) >= MAX_MODELS:
                self._records.pop(next(iter(self._records)))
            records = self._records[model] = deque(maxlen=self._capacity)
        records.append((self._clock(), status in FAILURE_CODES))

    def _recent(self, model: str) -> tuple[int, int]:
        """(records in the window, failures among them)."""
        records = self._records.get(model)
        if not records:
            return 0, 0
        cutoff = self._clock() - self._window_s
        total = failures = 0
        # Newest first: stop at the first record older than the window.
        for at, failed in reversed(records):
            if at < cutoff:
                break
            total += 1
            failures += failed
        return total, failures

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
