"""Limit arithmetic shared by every actor source (reference 3.2 and 3.3)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Protocol

DAY_S = 86400.0
# Glob characters of an allowlist entry: "*" any run of characters, "?" one.
_GLOB_CHARS = frozenset("*?")


def percentage_concurrency(limit: int, interval_s: float, percentage: float) -> int:
    """The reference's default concurrency: a percentage of the daily rate, at least 1.

    ``percentage`` is in percent (50 means half of the daily limit).
    """
    if interval_s <= 0 or limit <= 0:
        return 1
    daily = limit / (interval_s / DAY_S)
    return max(1, int(daily * (percentage / 100.0)))


def is_pattern(entry: str) -> bool:
    """True for an allowlist entry with glob characters (``claude-sonnet-*``)."""
    return not _GLOB_CHARS.isdisjoint(entry)


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts), re.DOTALL)


def glob_match(name: str, pattern: str) -> bool:
    """Case-insensitive: ``*`` matches any run of characters (``/`` included), ``?`` one.

    A pattern without glob characters matches only the same name.
    """
    if not is_pattern(pattern):
        return name.lower() == pattern.lower()
    return _compiled(pattern).fullmatch(name.lower()) is not None


def evaluate_allowed_models(actor_models: Sequence[str], master: Sequence[str]) -> list[str]:
    """The actor's list intersected with the master list; ["*"] = master.

    Entries may be glob patterns. An actor entry that falls under a master
    entry is kept (in the actor's order); a master entry that falls under an
    actor entry (a narrower pattern or a concrete id) is kept in its place.
    "Falls under" compares the entries as strings, so ``claude-sonnet-4-*``
    falls under ``claude-*``; two patterns that only overlap
    (``claude-sonnet-*`` and ``claude-*-4-5``) admit nothing together.
    """
    if list(actor_models) == ["*"]:
        return list(master)
    out: list[str] = []
    seen: set[str] = set()
    for entry in actor_models:
        for candidate in _narrower(entry, master):
            key = candidate.lower()
            if key not in seen:
                seen.add(key)
                out.append(candidate)
    return out


def _narrower(entry: str, master: Sequence[str]) -> list[str]:
    lowered = entry.lower()
    if not is_pattern(entry):
        return [entry] if any(glob_match(lowered, m) for m in master) else []
    if any(glob_match(lowered, m) for m in master):
        return [entry]
    return [m for m in master if glob_match(m, lowered)]


def prefix_bare_models(actor_models: Iterable[str], provider: str) -> list[str]:
    """Back-compat: completions allowlist entries without a provider prefix get one."""
    return [m if m == "*" or "/" in m else f"{provider}/{m}" for m in actor_models]


def is_model_allowed(model: str, allowed: Iterable[str], virtual: dict[str, frozenset[str]] | None = None) -> bool:
    """Case-insensitive match, entries may be glob patterns; ``virtual`` maps an
    allowed entry to extra ids it admits."""
    wanted = model.lower()
    for entry in allowed:
        if glob_match(wanted, entry):
            return True
        if virtual and wanted in virtual.get(entry.lower(), frozenset()):
            return True
    return False


class _HasVirtualModels(Protocol):
    def virtual_models(self) -> dict[str, frozenset[str]]: ...

    def __hash__(self) -> int: ...


# The same few allowlists and models come back on every request: evaluating
# the globs each time was a measurable share of a small request. Both caches
# are bounded (models are the client's choice).
@lru_cache(maxsize=2048)
def provider_allowlist(actor_models: tuple[str, ...], provider: str, master: tuple[str, ...]) -> tuple[str, ...]:
    """The actor's completions allowlist (bare entries prefixed) intersected with the provider's."""
    return tuple(evaluate_allowed_models(prefix_bare_models(actor_models, provider), master))


@lru_cache(maxsize=8192)
def model_admitted(model: str, allowed: tuple[str, ...], provider: _HasVirtualModels) -> bool:
    """``is_model_allowed`` with the provider's virtual models, cached."""
    return is_model_allowed(model, allowed, provider.virtual_models())
