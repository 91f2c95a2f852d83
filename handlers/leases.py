"""Renews the concurrency leases of long requests, from one timer per process.

A lease lives at most ``upstream.lease_ttl_s``, so a process that dies frees
its slots within that time. Every third of it a sweep renews the lease of
each request that has held it that long: a live request's lease is renewed
at least a third of its life before it would expire. A request costs one
dict insert and one delete; short requests (nearly all) are never renewed,
and no request has a timer of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from tornado.ioloop import PeriodicCallback

from background import BackgroundTasks
from limiter.base import Decision, Limiter, LimitRule

log = logging.getLogger("gateway.admission")


class HeldLease(Protocol):
    rule: LimitRule | None
    decision: Decision | None
    renewed_at: float


class LeaseKeeper:
    def __init__(self, limiter: Limiter, lease_ttl_s: float) -> None:
        self._limiter = limiter
        self._every_s = lease_ttl_s / 3
        self._held: dict[HeldLease, None] = {}
        self._timer: PeriodicCallback | None = None
        self._renewals = BackgroundTasks(log)

    def start(self) -> None:
        self._timer = PeriodicCallback(self.sweep, self._every_s * 1000)
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    def hold(self, lease: HeldLease) -> None:
        lease.renewed_at = time.monotonic()
        self._held[lease] = None

    def drop(self, lease: HeldLease) -> None:
        self._held.pop(lease, None)

    def sweep(self) -> None:
        now = time.monotonic()
        due = now - self._every_s
        for lease in self._held:
            rule, decision = lease.rule, lease.decision
            if rule is None or decision is None or lease.renewed_at > due:
                continue
            lease.renewed_at = now
            self._renewals.spawn(self._limiter.renew(rule, decision, rule.lease_ttl_s), "lease renewal")
