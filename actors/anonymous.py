"""The anonymous source: the empty token, gated by allow_anonymous (reference 2.5)."""

from __future__ import annotations

from actors.base import NotFromSource
from actors.limits import DAY_S, percentage_concurrency
from actors.model import (
    CHAT_COMPLETIONS,
    CODE_COMPLETIONS,
    EMBEDDINGS,
    Actor,
    RateLimit,
)


class AnonymousSource:
    name = "anonymous"

    def __init__(self, *, allow_anonymous: bool, concurrency_percentage: float, concurrency_interval_s: float) -> None:
        def limit(models: tuple[str, ...], per_day: int, concurrent: int | None = None) -> RateLimit:
            return RateLimit(
                allowed_models=models,
                limit=per_day,
                interval_s=DAY_S,
                concurrent_requests=concurrent or percentage_concurrency(per_day, DAY_S, concurrency_percentage),
                concurrent_interval_s=concurrency_interval_s,
            )

        self._actor = Actor(
            id="anonymous",
            name="anonymous",
            source=self.name,
            access_enabled=allow_anonymous,
            rate_limits={
                CHAT_COMPLETIONS: limit(
                    ("anthropic/claude-v1", "anthropic/claude-2", "anthropic/claude-2.0", "anthropic/claude-2.1"), 50
                ),
                CODE_COMPLETIONS: limit(
                    ("anthropic/claude-instant-v1", "anthropic/claude-instant-1", "anthropic/claude-instant-1.2"), 1000
                ),
                EMBEDDINGS: limit(("openai/text-embedding-ada-002",), 100_000, concurrent=10),
            },
        )

    async def get(self, token: str) -> Actor:
        if token:
            raise NotFromSource("not anonymous")
        return self._actor
