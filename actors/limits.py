"""Limit arithmetic shared by every actor source (reference 3.2 and 3.3)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DAY_S = 86400.0


def percentage_concurrency(limit: int, interval_s: float, percentage: float) -> int:
    """The reference's default concurrency: a percentage of the daily rate, at least 1.

    ``percentage`` is in percent (50 means half of the daily limit).
    """
    if interval_s <= 0 or limit <= 0:
        return 1
    daily = limit / (interval_s / DAY_S)
    return max(1, int(daily * (percentage / 100.0)))


def evaluate_allowed_models(actor_models: Sequence[str], master: Sequence[str]) -> list[str]:
    """The actor's list intersected with the master list, in the actor's order; ["*"] = master."""
    if list(actor_models) == ["*"]:
        return list(master)
    master_set = set(master)
    return [m for m in actor_models if m in master_set]


def prefix_bare_models(actor_models: Iterable[str], provider: str) -> list[str]:
    """Back-compat: completions allowlist entries without a provider prefix get one."""
    return [m if m == "*" or "/" in m else f"{provider}/{m}" for m in actor_models]


def is_model_allowed(model: str, allowed: Iterable[str], virtual: dict[str, frozenset[str]] | None = None) -> bool:
    """Case-insensitive match; ``virtual`` maps an allowed entry to extra ids it admits."""
    wanted = model.lower()
    for entry in allowed:
        if entry.lower() == wanted:
            return True
        if virtual and wanted in virtual.get(entry.lower(), frozenset()):
            return True
    return False
