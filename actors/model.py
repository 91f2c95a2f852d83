"""Who is calling: the Actor and its per-feature RateLimits.

Actors are immutable. Their JSON form is the reference's cached shape
(intervals in integer nanoseconds, ``lastUpdated`` RFC 3339), plus
``source`` and ``tokensLimit``, so a cache written by one gateway process
is readable by every other.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

CODE_COMPLETIONS = "code_completions"
CHAT_COMPLETIONS = "chat_completions"
EMBEDDINGS = "embeddings"
# The reference's iteration order (AllFeatures).
FEATURES: tuple[str, ...] = (CODE_COMPLETIONS, CHAT_COMPLETIONS, EMBEDDINGS)
COMPLETION_FEATURES: frozenset[str] = frozenset({CODE_COMPLETIONS, CHAT_COMPLETIONS})

NS_PER_S = 1_000_000_000

# The one subscription id the reference treats as a Sourcegraph.com actor.
DOTCOM_SUBSCRIPTION_ID = "d3d2b638-d0a2-4539-a099-b36860b09819"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One feature's limits for one actor.

    ``limit`` requests (embeddings: tokens) per ``interval_s``, refilled
    continuously. ``concurrent_requests`` is the number of requests in
    flight at once (None: the limiter applies the percentage default).
    ``tokens_limit`` is an optional extra token quota per ``interval_s``
    for completions.
    """

    allowed_models: tuple[str, ...]
    limit: int
    interval_s: float
    concurrent_requests: int | None = None
    concurrent_interval_s: float | None = None
    tokens_limit: int | None = None

    def is_valid(self) -> bool:
        return self.interval_s > 0 and self.limit > 0 and len(self.allowed_models) > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "allowedModels": list(self.allowed_models),
            "limit": self.limit,
            "interval": int(round(self.interval_s * NS_PER_S)),
            "concurrentRequests": self.concurrent_requests or 0,
            "concurrentRequestsInterval": int(round((self.concurrent_interval_s or 0) * NS_PER_S)),
        }
        if self.tokens_limit is not None:
            out["tokensLimit"] = self.tokens_limit
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RateLimit:
        concurrent = int(data.get("concurrentRequests") or 0)
        concurrent_interval = int(data.get("concurrentRequestsInterval") or 0) / NS_PER_S
        tokens_limit = data.get("tokensLimit")
        return cls(
            allowed_models=tuple(data.get("allowedModels") or ()),
            limit=int(data.get("limit") or 0),
            interval_s=int(data.get("interval") or 0) / NS_PER_S,
            concurrent_requests=concurrent or None,
            concurrent_interval_s=concurrent_interval or None,
            tokens_limit=int(tokens_limit) if tokens_limit is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Actor:
    id: str
    name: str
    source: str
    access_enabled: bool
    rate_limits: Mapping[str, RateLimit] = field(default_factory=lambda: MappingProxyType({}))
    endpoint_access: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    last_updated: float | None = None
    # The cache key the actor was found under (a token or its hash); never logged.
    key: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_limits", MappingProxyType(dict(self.rate_limits)))
        object.__setattr__(self, "endpoint_access", MappingProxyType(dict(self.endpoint_access)))

    @property
    def display_name(self) -> str:
        return self.name or self.id

    def is_empty(self) -> bool:
        return not self.id

    def is_dotcom(self) -> bool:
        if self.source == "dotcom-user":
            return True
        return self.source in ("dotcom-product-subscriptions", "product-subscriptions") and (
            self.id == DOTCOM_SUBSCRIPTION_ID
        )

    def access_allowed(self, path: str) -> bool:
        """The reference's isAccessEnabled: the flag, else per-path prefix grants."""
        if self.access_enabled:
            return True
        stripped = path.lstrip("/")
        for prefix, allowed in self.endpoint_access.items():
            if stripped.startswith(prefix.lstrip("/")):
                return allowed
        return False

    def limit_for(self, feature: str) -> RateLimit | None:
        rate_limit = self.rate_limits.get(feature)
        if rate_limit is None or not rate_limit.is_valid():
            return None
        return rate_limit

    def with_updates(self, **changes: Any) -> Actor:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "accessEnabled": self.access_enabled,
            "endpointAccess": dict(self.endpoint_access) or None,
            "rateLimits": {f: rl.to_json() for f, rl in self.rate_limits.items()},
            "lastUpdated": _format_time(self.last_updated),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Actor:
        return cls(
            key=str(data.get("key") or ""),
            id=str(data.get("id") or ""),
            name=str(data.get("name") or ""),
            source=str(data.get("source") or ""),
            access_enabled=bool(data.get("accessEnabled")),
            endpoint_access=dict(data.get("endpointAccess") or {}),
            rate_limits={
                f: RateLimit.from_json(rl) for f, rl in (data.get("rateLimits") or {}).items()
            },
            last_updated=_parse_time(data.get("lastUpdated")),
        )


def _format_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    text = str(value).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(text).timestamp()
