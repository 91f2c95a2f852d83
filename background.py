"""Fire-and-forget tasks, done right once: kept referenced until they end (the
loop holds only weak references), their failures logged, countable, and
awaitable at shutdown. Every package that starts work it does not wait for
(limiter releases, notifications, prompt recording, OTLP posts, the event
pipeline) uses one of these instead of its own set and done callback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any


class BackgroundTasks:
    __slots__ = ("_log", "_tasks", "_on_done")

    def __init__(self, logger: logging.Logger, *, on_done: Callable[[], None] | None = None) -> None:
        self._log = logger
        self._tasks: set[asyncio.Future[Any]] = set()
        self._on_done = on_done

    def spawn(self, work: Awaitable[Any], what: str) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._log.error("%s failed: %s", what, t.exception(), exc_info=t.exception())
            if self._on_done is not None:
                self._on_done()

        task.add_done_callback(done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> None:
        """Let the tasks running now finish, for at most ``timeout_s``."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    async def cancel(self) -> None:
        """Give up on the tasks still running, and wait until they have stopped."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
