"""Shared fixtures: real processes (gateway, fake provider, redis-server), always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes.processes import FakeProviderProcess, GatewayProcess, write_actors
from tests.support.redis_servers import (  # noqa: F401  (fixtures)
    redis_cluster,
    redis_cluster_private,
    redis_cluster_session,
    redis_server,
    redis_server_private,
    redis_server_session,
)

DIAGNOSTICS_SECRET = "diag-secret-for-tests"
ANTHROPIC_KEY = "sk-ant-upstream-secret"
TOKEN_A = "sgd_" + "a" * 64
TOKEN_B = "sgd_" + "b" * 64


def limits(limit: int = 1000, interval: str = "1h", models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"limit": limit, "interval": interval, "allowedModels": models or ["*"], **extra}


def actor(actor_id: str, token: str, **rate_limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": actor_id,
        "name": actor_id,
        "accessEnabled": True,
        "token": token,
        "rateLimits": rate_limits
        or {"chat_completions": limits(), "code_completions": limits(), "embeddings": limits(1_000_000)},
    }


DEFAULT_ACTORS = [actor("actor-a", TOKEN_A), actor("actor-b", TOKEN_B)]


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProviderProcess]:
    fake = FakeProviderProcess()
    yield fake
    fake.stop()


@pytest.fixture
def gateway_env(tmp_path: Path, fake_provider: FakeProviderProcess) -> dict[str, str]:
    return {
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": DIAGNOSTICS_SECRET,
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": ANTHROPIC_KEY,
        "CODY_GATEWAY_ANTHROPIC_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "sk-openai-upstream-secret",
        "CODY_GATEWAY_OPENAI_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": "fw-upstream-secret",
        "CODY_GATEWAY_FIREWORKS_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "google-upstream-secret",
        "CODY_GATEWAY_GOOGLE_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": "smega-upstream-secret",
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_URL": fake_provider.base_url + "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer",
        "CODY_GATEWAY_EVENTS_FILE": str(tmp_path / "events.jsonl"),
        "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(tmp_path / "spool"),
        "CODY_GATEWAY_EVENTS_FLUSH_INTERVAL_MS": "50",
        "CODY_GATEWAY_STATIC_ACTORS_FILE": str(tmp_path / "actors.json"),
        "CODY_GATEWAY_UPSTREAM_RETRY_BASE_DELAY_MS": "10",
        "CODY_GATEWAY_UVLOOP": "1",
    }


@pytest.fixture
def start_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, gateway_env: dict[str, str]
) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []
    request.node._gateways = started

    def start(
        actors: list[dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        name: str = "gateway",
    ) -> GatewayProcess:
        full_env = {**gateway_env, **(env or {})}
        write_actors(Path(full_env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), DEFAULT_ACTORS if actors is None else actors)
        gw = GatewayProcess(tmp_path, full_env, args=args, name=name)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the tail of every gateway's log to the report."""
    report = yield
    if report.when == "call" and report.failed:
        for gw in getattr(item, "_gateways", []):
            report.sections.append((f"{gw.process.name} log", gw.process.output()[-6000:]))
    return report
