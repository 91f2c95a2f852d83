"""The seam every actor source plugs into, and the outcomes a source can report."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from actors.model import Actor


class NotFromSource(Exception):
    """Sentinel: this source does not handle the token; try the next one."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"token not from source: {reason}")
        self.reason = reason


class SourceError(Exception):
    """A hard answer from a source; stops the chain."""


class InvalidTokenFormat(SourceError):
    """A known prefix with the wrong length or non-hex body (SPEC: 401, not 503)."""

    def __init__(self) -> None:
        super().__init__("invalid token format")


class TokenDenied(SourceError):
    """The source knows the token's shape and says no (401 plus an Unauthorized event)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"failed to validate access token: access token denied: {reason}")
        self.reason = reason


class SourceUnavailable(SourceError):
    """The source could not be reached and no usable cached actor exists (503)."""


class ActorRecentlyUpdated(SourceError):
    def __init__(self, retry_in_s: float) -> None:
        from conf.durations import format_go_duration

        super().__init__(
            f"actor was recently updated - try again in {format_go_duration(int(retry_in_s))}"
        )
        self.retry_in_s = retry_in_s


@runtime_checkable
class ActorSource(Protocol):
    """Resolves a bearer token to an Actor.

    ``get`` raises NotFromSource to pass, or a SourceError to stop the chain.
    Sources are shared by all requests and must be safe to call concurrently.
    """

    name: str

    async def get(self, token: str) -> Actor: ...


@runtime_checkable
class UpdatableSource(Protocol):
    """A source that can re-fetch one actor on demand (POST /v1/limits/refresh)."""

    name: str

    async def update(self, actor: Actor, token: str) -> Actor:
        """``token`` is the caller's own (only its digest is ever stored)."""
        ...


@runtime_checkable
class SyncableSource(Protocol):
    """A source that can refresh all of its actors at once (periodic sync)."""

    name: str

    async def sync(self) -> int: ...
