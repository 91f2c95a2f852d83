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
from pathlib import Path
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


# -- a gateway with every route -----------------------------------------------------------


def full_env(workdir: Path, fake_base: str, **extra: str) -> dict[str, str]:
    """Every provider on the fake, events in ``workdir``, the test secrets."""
    from tests.conftest import ANTHROPIC_KEY, DIAGNOSTICS_SECRET

    env = {
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": DIAGNOSTICS_SECRET,
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": ANTHROPIC_KEY,
        "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "sk-openai-upstream-secret",
        "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": "fw-upstream-secret",
        "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "google-upstream-secret",
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": "smega-upstream-secret",
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_URL": fake_base + "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer",
        "CODY_GATEWAY_EVENTS_FILE": str(workdir / "events.jsonl"),
        "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(workdir / "spool"),
        "CODY_GATEWAY_EVENTS_FLUSH_INTERVAL_MS": "50",
        "CODY_GATEWAY_STATIC_ACTORS_FILE": str(workdir / "actors.json"),
        "CODY_GATEWAY_UPSTREAM_RETRY_BASE_DELAY_MS": "10",
        "CODY_GATEWAY_UVLOOP": "1",
        # Hostile clients may leave requests behind; a test gateway must still stop promptly.
        "CODY_GATEWAY_SERVER_DRAIN_TIMEOUT_S": "2",
    }
    for provider in ("ANTHROPIC", "OPENAI", "FIREWORKS", "GOOGLE"):
        env[f"CODY_GATEWAY_{provider}_API_URL"] = fake_base
    env.update(extra)
    return env


def start_full_gateway(workdir: Path, env: dict[str, str], actors: list[dict[str, Any]], name: str = "gateway") -> Any:
    """``gateway.py`` with ``actors`` in its static file."""
    from fakes.processes import GatewayProcess, write_actors

    write_actors(Path(env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), actors)
    return GatewayProcess(workdir, env, name=name)


def unlimited_actor(actor_id: str, token: str) -> dict[str, Any]:
    big = {"limit": 10_000_000, "interval": "1h", "allowedModels": ["*"], "concurrentRequests": 1000}
    return {
        "id": actor_id,
        "name": actor_id,
        "accessEnabled": True,
        "token": token,
        "rateLimits": {"chat_completions": big, "code_completions": big, "embeddings": {**big, "limit": 100_000_000}},
    }


@pytest.fixture(scope="module")
def private_fake() -> Iterator[Any]:
    """A fake provider for one fuzz module, so that whatever the fuzzer makes it do
    (huge embeddings, odd directives) cannot disturb other modules' tests."""
    from fakes.processes import FakeProviderProcess

    fake = FakeProviderProcess()
    yield fake
    fake.stop()
