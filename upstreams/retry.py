"""The one retry policy of upstream calls, and what a failed attempt tells the client.

Completions and embeddings retry through the same ``RetryPolicy``; what
differs between them (the Sourcegraph embeddings service's short 5^n ms
backoff that retries any failure, as the reference does) is a parameter,
not a copy. A retry happens only before anything reached the client; the
callers make sure of that.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tornado.httputil import HTTPHeaders

from conf.model import UpstreamConfig
from errors import GatewayError, UpstreamError, UpstreamTimeout
from upstreams import transport as tp

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Attempts that never got an answer but may get one if asked again.
RETRYABLE_FAILURES = frozenset({tp.CONNECT_ERROR, tp.RESET})
# Running out of time, or the client leaving, is never retried.
_FINAL = frozenset({tp.TIMEOUT, tp.STALL, tp.CLIENT_GONE})


def jittered_exponential(base_s: float, max_s: float) -> Callable[[int], float]:
    """Full jitter: uniform in [0, min(max, base * 2^(n-1))] before attempt n+1."""

    def delay(attempt_no: int) -> float:
        return random.uniform(0, min(max_s, base_s * (2 ** (attempt_no - 1))))

    return delay


def smega_backoff(attempt_no: int) -> float:
    """The reference's embeddings backoff: 5^n ms, +-50 % jitter (5 ms, then 25 ms)."""
    millis: int = 5**attempt_no
    return millis / 1000 * random.uniform(0.5, 1.5)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff: Callable[[int], float]
    # Statuses worth another attempt; None: any status but a success.
    retryable_statuses: frozenset[int] | None = RETRYABLE_STATUSES
    # Failures without a status worth another attempt; None: any but running out of time.
    retryable_failures: frozenset[tp.Outcome] | None = RETRYABLE_FAILURES
    # A Retry-After up to this long is waited out (never less than ``min_delay_s``);
    # a longer one ends the retries. None: Retry-After is not read.
    retry_after_max_s: float | None = None
    min_delay_s: float = 0.0

    def delay(self, attempt: tp.Attempt, attempt_no: int) -> float | None:
        """Seconds to wait before attempt ``attempt_no + 1``, or None: no more attempts."""
        if attempt_no >= self.max_attempts:
            return None
        if attempt.outcome == tp.OK:
            status = attempt.status or 0
            statuses = self.retryable_statuses
            if 200 <= status < 300 or (statuses is not None and status not in statuses):
                return None
            if self.retry_after_max_s is not None:
                retry_after = retry_after_seconds(attempt.headers)
                if retry_after is not None:
                    return None if retry_after > self.retry_after_max_s else max(self.min_delay_s, retry_after)
        elif attempt.outcome in _FINAL or (self.retryable_failures is not None and attempt.outcome not in self.retryable_failures):
            return None
        return self.backoff(attempt_no)


def upstream_policy(config: UpstreamConfig) -> RetryPolicy:
    """Completions and OpenAI embeddings: transient statuses and lost connections, Retry-After honoured."""
    return RetryPolicy(
        max_attempts=config.retry_max_attempts,
        backoff=jittered_exponential(config.retry_base_delay_ms / 1000, config.retry_max_delay_ms / 1000),
        retry_after_max_s=config.retry_after_max_s,
        min_delay_s=config.retry_base_delay_ms / 1000,
    )


# Sourcegraph embeddings: any failure but running out of time, 3 attempts (the reference).
SMEGA_POLICY = RetryPolicy(max_attempts=3, backoff=smega_backoff, retryable_statuses=None, retryable_failures=None)


def retry_after_seconds(headers: HTTPHeaders | None) -> float | None:
    if headers is None:
        return None
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    # Bounded: a number from outside never reaches a timer unchecked.
    return value if 0 <= value <= 86_400 else None


def failure_error(
    attempt: tp.Attempt, provider: str, *, stall_s: float, headers: Mapping[str, str] | None = None
) -> GatewayError:
    """The client's answer for an attempt that got no usable response (no status to relay)."""
    extra = dict(headers or {})
    if attempt.outcome == tp.REJECTED:
        return UpstreamError(attempt.message, headers=extra)
    if attempt.outcome == tp.TIMEOUT:
        return UpstreamTimeout(f"request to upstream provider {provider} timed out", headers=extra)
    if attempt.outcome == tp.STALL:
        return UpstreamTimeout(f"upstream provider {provider} stalled: no data for {stall_s:g}s", headers=extra)
    if attempt.outcome == tp.CONNECT_ERROR:
        return UpstreamError(f"failed to connect to upstream provider {provider}", headers=extra)
    if attempt.outcome == tp.RESET:
        return UpstreamError(f"upstream provider {provider} closed the connection unexpectedly", headers=extra)
    return UpstreamError(f"failed to make request to upstream provider {provider}: {attempt.message}", headers=extra)
