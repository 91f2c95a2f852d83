"""Helpers shared by the tests/test_providers_*.py files.

``WiredGateway`` is the real ``gateway.py`` with event lookups by trace id.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.processes import GatewayProcess, wait_until, write_actors
from tests.conftest import DEFAULT_ACTORS, DIAGNOSTICS_SECRET, TOKEN_A
from tests.support.error_shapes import error_message

FIXTURES = Path(__file__).parent / "fixtures" / "sse"



class WiredGateway(GatewayProcess):
    """A gateway process with helpers to find a request's events by trace id."""

    def event_for(self, trace_id: str, name: str = "CompletionsFinished", timeout: float = 10.0) -> dict[str, Any]:
        """The one event of a request; fails if there is none or more than one."""
        found = wait_until(lambda: [e for e in self.events(name) if e["metadata"].get("trace_id") == trace_id], timeout,
                           what=f"{name} event of trace {trace_id}")
        return found[0]

    def events_for(self, trace_id: str, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events(name) if e["metadata"].get("trace_id") == trace_id]


@pytest.fixture
def start_wired(request: pytest.FixtureRequest, tmp_path: Path, gateway_env: dict[str, str]) -> Iterator[Callable[..., WiredGateway]]:
    """Like conftest's start_gateway, for a WiredGateway (import it into the test module)."""
    started: list[WiredGateway] = []
    request.node._gateways = started

    def start(actors: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None, name: str = "gateway") -> WiredGateway:
        full_env = {**gateway_env, **(env or {})}
        write_actors(Path(full_env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), DEFAULT_ACTORS if actors is None else actors)
        workdir = tmp_path / f"{name}-{len(started)}"
        workdir.mkdir()
        gw = WiredGateway(workdir, full_env, name=name)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def base_env(workdir: Path, fake_base: str) -> dict[str, str]:
    """What conftest's gateway_env gives, for gateways that outlive one test."""
    env = {
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": DIAGNOSTICS_SECRET,
        "CODY_GATEWAY_EVENTS_FILE": str(workdir / "events.jsonl"),
        "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(workdir / "spool"),
        "CODY_GATEWAY_EVENTS_FLUSH_INTERVAL_MS": "50",
        "CODY_GATEWAY_STATIC_ACTORS_FILE": str(workdir / "actors.json"),
        "CODY_GATEWAY_UPSTREAM_RETRY_BASE_DELAY_MS": "10",
        "CODY_GATEWAY_UVLOOP": "1",
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": "sk-ant-upstream-secret",
        "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": "sk-openai-upstream-secret",
        "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": "fw-upstream-secret",
        "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": "google-upstream-secret",
    }
    for provider in ("ANTHROPIC", "OPENAI", "FIREWORKS", "GOOGLE"):
        env[f"CODY_GATEWAY_{provider}_API_URL"] = fake_base
    return env


@pytest.fixture(scope="module")
def start_module_wired(tmp_path_factory: pytest.TempPathFactory, fake_provider: Any) -> Iterator[Callable[..., WiredGateway]]:
    """A WiredGateway shared by the tests of one module (tests find their events by trace id)."""
    started: list[WiredGateway] = []

    def start(actors: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None, name: str = "gateway") -> WiredGateway:
        workdir = tmp_path_factory.mktemp(name)
        full_env = {**base_env(workdir, fake_provider.base_url), **(env or {})}
        write_actors(Path(full_env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), DEFAULT_ACTORS if actors is None else actors)
        gw = WiredGateway(workdir, full_env, name=name)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gw(shared: WiredGateway, request: pytest.FixtureRequest) -> WiredGateway:
    """The module's ``shared`` gateway (each test module defines ``shared``), with its output kept on failure."""
    request.node._gateways = [shared]
    return shared


def marker() -> str:
    return "mark-" + uuid.uuid4().hex[:12]


def fake_requests(fake_base: str) -> list[dict[str, Any]]:
    return httpx.get(fake_base + "/_fake/requests", timeout=10).json()


def received(fake_base: str, mark: str, count: int = 1) -> list[dict[str, Any]]:
    """The requests the fake provider received whose body contains ``mark``."""
    def find() -> list[dict[str, Any]] | None:
        hits = [r for r in fake_requests(fake_base) if mark in json.dumps(r["body"])]
        return hits if len(hits) >= count else None

    return wait_until(find, 10, what=f"fake provider request with {mark}")


def post(gw: GatewayProcess, path: str, body: Any, *, token: str | None = TOKEN_A, feature: str | None = "chat_completions",
         headers: dict[str, str] | None = None, timeout: float = 30) -> httpx.Response:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if feature is not None:
        hdrs["X-Sourcegraph-Feature"] = feature
    return httpx.post(gw.base_url + path, content=json.dumps(body).encode(), headers=hdrs, timeout=timeout)


def sse_data(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


def assert_json_error(response: httpx.Response, status: int, contains: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert contains in error_message(body, response.request.url.path), body
    return body
