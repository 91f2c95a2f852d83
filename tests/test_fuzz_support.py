"""Shared by the fuzz and property tests: case counting and the end-of-run summary.

``@counted("target")`` (under ``@given``) counts every case a fuzz target
really ran; the ``fuzz_summary`` fixture (autouse, imported by each fuzz
module) prints one line per target in pytest's terminal summary, so a run
shows how many cases each target got. Budgets are kept here so that the
whole set of fuzz files stays within its time allowance on a busy machine.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

# FUZZ_SCALE=10 runs ten times as many cases (for a longer, local soak).
SCALE = max(0.1, float(os.environ.get("FUZZ_SCALE", "1")))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


class CaseCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, target: str, n: int = 1) -> None:
        self.counts[target] += n

    # pytest hook, called once at the end of the run.
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.counts:
            return
        terminalreporter.section("fuzz cases run")
        for target, n in sorted(self.counts.items()):
            terminalreporter.write_line(f"{n:8d}  {target}")
        terminalreporter.write_line(f"{sum(self.counts.values()):8d}  total")


CASES = CaseCounter()


def counted(target: str) -> Callable[[F], F]:
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            CASES.add(target)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


@pytest.fixture(scope="session", autouse=True)
def fuzz_summary(request: pytest.FixtureRequest) -> Iterator[CaseCounter]:
    manager = request.config.pluginmanager
    if not manager.is_registered(CASES):
        manager.register(CASES, "fuzz-case-counter")
    yield CASES
