"""RateLimited events, sampled per actor, feature and cause, so a retry loop cannot flood the sink.

Every refusal is counted in metrics (``cody_gateway_limiter_decisions_total``);
the usage events say the same at a bounded rate: the first refusal of an
(actor, feature, cause) in a window is recorded, with ``refusals`` = how many
refusals it stands for (itself plus those suppressed since the previous
event of that key); the others in the window are not recorded. Summing
``refusals`` over the events gives every refusal except those still
suppressed in a window that is open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 10.0
# Keys kept at most; the oldest windows go first (an event is then simply recorded again).
MAX_KEYS = 10_000


class RefusalSampler:
    __slots__ = ("_window_s", "_max_keys", "_clock", "_windows")

    def __init__(self, window_s: float = WINDOW_S, *, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        # key -> [window start, refusals suppressed since the last event]
        self._windows: dict[tuple[str, str, str], list[float]] = {}

    def admit(self, actor_id: str, feature: str, cause: str) -> int | None:
        """How many refusals to record with this one's event, or None: record no event."""
        key = (actor_id, feature, cause)
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self._window_s:
            window[1] += 1
            return None
        suppressed = int(window[1]) if window is not None else 0
        if window is None and len(self._windows) >= self._max_keys:
            del self._windows[next(iter(self._windows))]
        self._windows.pop(key, None)
        self._windows[key] = [now, 0]
        return suppressed + 1
