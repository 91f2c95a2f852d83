"""Fixtures for the observability tests: an in-process gateway factory, always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes.processes import write_actors
from tests.support.observed_gateway import InProcessGateway


@pytest.fixture
def observed_gateway(gateway_env: dict[str, str]) -> Iterator[Callable[..., InProcessGateway]]:
    started: list[InProcessGateway] = []

    def start(actors: list[dict[str, Any]], *, env: dict[str, str] | None = None, **kwargs: Any) -> InProcessGateway:
        environ = {**gateway_env, **(env or {})}
        write_actors(Path(environ["CODY_GATEWAY_STATIC_ACTORS_FILE"]), actors)
        gw = InProcessGateway(environ, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
