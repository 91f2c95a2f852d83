"""Throttles guesses of the diagnostics secret per client address.

Each address may fail ``burst`` times, then once per ``1 / rate_per_s``
seconds (a token bucket per address); beyond that it is answered 429
without the secret even being compared. A correct secret is never refused
for an address that still has a token, and success costs nothing. The
table is bounded: the longest-idle addresses go first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_ADDRESSES = 10_000


class GuessThrottle:
    __slots__ = ("_burst", "_rate", "_clock", "_buckets")

    def __init__(self, *, burst: float = 10.0, rate_per_s: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self._burst = burst
        self._rate = rate_per_s
        self._clock = clock
        # address -> (tokens, last update)
        self._buckets: dict[str, tuple[float, float]] = {}

    def retry_after_s(self, address: str) -> float:
        """0 when ``address`` may try now; else how long until it may."""
        entry = self._buckets.get(address)
        if entry is None:
            return 0.0
        tokens = self._tokens(entry)
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate

    def failed(self, address: str) -> None:
        now = self._clock()
        entry = self._buckets.pop(address, None)
        tokens = self._tokens(entry) if entry is not None else self._burst
        if entry is None and len(self._buckets) >= MAX_ADDRESSES:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[address] = (max(0.0, tokens - 1), now)

    def _tokens(self, entry: tuple[float, float]) -> float:
        tokens, last = entry
        return min(self._burst, tokens + (self._clock() - last) * self._rate)
