"""The periodic actor-source sync, run by one gateway process at a time (reference 2.6).

Every process runs a SyncWorker; a Redis lock named ``source-syncer-worker``
(expiry 4x the interval, extended on every tick) decides which one syncs.
When the holder stops it releases the lock, and another process takes it on
its next tick; when the holder dies, the lock expires and the same happens.
Without Redis (the embedded default) there is only one process, so it
always syncs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

log = logging.getLogger("gateway.actors.sync")

LOCK_NAME = "source-syncer-worker"
RELEASE_TIMEOUT_S = 10.0

# KEYS[1] lock key; ARGV[1] owner token; ARGV[2] expiry in ms. Returns 1 if we own it afterwards.
_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock key; ARGV[1] owner token. Returns 1 if our lock was deleted.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockClient(Protocol):
    """The redis-py calls the lock needs (redis.asyncio.Redis or RedisCluster)."""

    def set(self, name: str, value: str, *, nx: bool, px: int) -> Any: ...

    def register_script(self, script: str) -> Any: ...


class SyncWorker:
    def __init__(
        self,
        sync: Callable[[], Awaitable[object]],
        redis: LockClient | None,
        *,
        interval_s: float,
        lock_name: str = LOCK_NAME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self._redis = redis
        self._interval = interval_s
        self._expiry_ms = max(1, int(interval_s * 4 * 1000))
        self._lock_name = lock_name
        self._clock = clock
        self._token = secrets.token_hex(16)
        self._held_until: float | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock_errors = False
        if redis is not None:
            self._extend_script: Callable[..., Awaitable[Any]] = redis.register_script(_EXTEND_LUA)
            self._release_script: Callable[..., Awaitable[Any]] = redis.register_script(_RELEASE_LUA)
        # Observable by tests and metrics.
        self.syncs = 0
        self.skipped = 0
        self.failures = 0
        self.last_result: object = None

    @property
    def holds_lock(self) -> bool:
        if self._redis is None:
            return True
        return self._held_until is not None and self._held_until > self._clock()

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop ticking, then release the lock if held so another process takes over."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._redis is not None and self._held_until is not None:
            try:
                await asyncio.wait_for(self._release(), timeout=RELEASE_TIMEOUT_S)
            except Exception as exc:  # the lock expires on its own
                log.warning("could not release the %s lock: %s", self._lock_name, exc)

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)
            except TimeoutError:
                continue

    async def tick(self) -> bool:
        """One round: make sure we hold the lock, then sync. True when a sync ran."""
        if self._redis is not None:
            if self.holds_lock:
                if not await self._extend():
                    log.warning("lost the %s lock; another process will sync", self._lock_name)
                    await self._release_quietly()
                    self.skipped += 1
                    return False
            elif not await self._acquire():
                self.skipped += 1
                return False
        try:
            self.last_result = await asyncio.wait_for(self._sync(), timeout=self._interval)
            self.syncs += 1
            return True
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            self.failures += 1
            log.error("actor source sync did not finish within %.1fs", self._interval)
        except Exception as exc:  # the next tick tries again
            self.failures += 1
            log.error("actor source sync failed: %s", exc)
        return False

    async def _acquire(self) -> bool:
        started = self._clock()
        try:
            # Only called with a lock client (tick() checks).
            ok = await cast(LockClient, self._redis).set(self._lock_name, self._token, nx=True, px=self._expiry_ms)
        except Exception as exc:
            self._lock_error("acquire", exc)
            return False
        self._lock_ok()
        if ok:
            self._held_until = started + self._expiry_ms / 1000
            log.info("took the %s lock; this process syncs actor sources", self._lock_name)
            return True
        self._held_until = None
        return False

    async def _extend(self) -> bool:
        started = self._clock()
        try:
            ok = await self._extend_script(keys=[self._lock_name], args=[self._token, self._expiry_ms])
        except Exception as exc:
            self._lock_error("extend", exc)
            return False
        self._lock_ok()
        if ok:
            self._held_until = started + self._expiry_ms / 1000
            return True
        self._held_until = None
        return False

    async def _release(self) -> None:
        self._held_until = None
        await self._release_script(keys=[self._lock_name], args=[self._token])

    async def _release_quietly(self) -> None:
        try:
            await self._release()
        except Exception:
            pass

    def _lock_error(self, op: str, exc: BaseException) -> None:
        self._held_until = None
        if not self._lock_errors:
            self._lock_errors = True
            log.error("sync lock %s failed (%s); skipping syncs until Redis answers", op, exc)

    def _lock_ok(self) -> None:
        if self._lock_errors:
            self._lock_errors = False
            log.warning("sync lock reachable again")
