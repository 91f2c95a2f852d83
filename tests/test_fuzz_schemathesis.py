"""Schemathesis against the gateway's own description (GET /openapi.json), on a running gateway.

Every operation is fuzzed with schema-valid and schema-invalid requests,
with a valid actor token (and the diagnostics secret on /-/ routes) and
without one. Every response must be documented (status, content type,
headers, body schema), nothing may be a 5xx, nothing may hang, every 4xx
the gateway produces is ``{"error": "<message>"}``, and the gateway's log
must hold no unhandled exception afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import DIAGNOSTICS_SECRET
from tests.support.error_shapes import error_message
from tests.test_fuzz_support import counted, examples, full_env, fuzz_summary, private_fake, start_full_gateway, unlimited_actor  # noqa: F401

TOKEN = "sgd_" + "f" * 64
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance]
# Each request must be answered well within this; a slower answer counts as a hang.
REQUEST_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, private_fake: Any) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("fuzz-gateway")
    gw = start_full_gateway(workdir, full_env(workdir, private_fake.base_url), [unlimited_actor("fuzzer", TOKEN)], name="fuzz gateway")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def schema(gateway: Any) -> Any:
    document = httpx.get(gateway.base_url + "/openapi.json", timeout=10).json()
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.base_url = gateway.base_url
    return loaded


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def auth_headers(path: str, mode: str) -> dict[str, str]:
    if mode == "none":
        return {}
    secret = DIAGNOSTICS_SECRET if path.startswith("/-/") else TOKEN
    return {"Authorization": f"Bearer {secret}"}


# Positive cases name an allowed model, so that they go all the way to the (fake) upstream.
MODELS = {
    "/v1/completions/anthropic-messages": "claude-3-haiku-20240307",
    "/anthropic/v1/messages": "claude-3-haiku-20240307",
    "/v1/completions/anthropic": "claude-instant-1.2",
    "/v1/completions/openai": "gpt-4o",
    "/openai/v1/chat/completions": "gpt-4o",
    "/v1/completions/fireworks": "starcoder",
    "/v1/completions/google": "gemini-1.5-flash-latest",
    "/v1/embeddings": "openai/text-embedding-3-small",
    "/openai/v1/embeddings": "text-embedding-3-small",
}


def steer(path: str, generation: GenerationMode) -> Any:
    def apply(case: Any) -> Any:
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("dimensions"), int) and body["dimensions"] > 4096:
            # The gateway forwards any dimensions (see test_hostile_client) and the fake would
            # build a vector that size; keep the fuzz about the gateway, not the fake's memory.
            body["dimensions"] = 4096
        if generation != GenerationMode.POSITIVE:
            return case
        if isinstance(case.body, dict) and path in MODELS:
            case.body["model"] = MODELS[path]
        if case.headers and "X-Timeout-Ms" in case.headers:
            # A client asking for a 1 ms deadline gets a (documented) 504; that is not what is fuzzed here.
            case.headers["X-Timeout-Ms"] = "30000"
        return case

    return apply


def header(response: Any, name: str) -> str:
    values = response.headers.get(name.lower()) or []
    return values[0] if values else ""


def check_response(case: Any, response: Any) -> None:
    case.validate_response(response, checks=CHECKS)
    status = response.status_code
    assert status < 500, f"{case.method} {case.path} -> {status}: {response.text[:300]}"
    for name in ("X-Trace", "X-Trace-Span", "X-Span"):
        assert header(response, name), f"{name} missing on {case.method} {case.path} -> {status}"
    if 400 <= status < 500 and case.method.upper() != "HEAD":
        assert header(response, "Content-Type").startswith("application/json"), response.headers
        body = json.loads(response.content)
        assert isinstance(body, dict) and error_message(body, case.path), body


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["valid", "none"])
def test_every_operation_conforms_and_never_fails(schema: Any, gateway: Any, session: requests.Session, mode: str) -> None:
    ops = operations(schema)
    assert len(ops) >= 20, [op.path for op in ops]
    for operation in ops:
        for generation in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            budget = examples(12 if mode == "valid" else 5)
            headers = auth_headers(operation.path, mode)

            @settings(
                max_examples=budget,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy(generation_mode=generation).map(steer(operation.path, generation)))
            @counted(f"schemathesis {mode} token: {operation.method.upper()} {operation.path}")
            def run(case: Any) -> None:
                response = case.call(session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)  # noqa: B023 - run() is called within this iteration
                check_response(case, response)

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): the positive run covered it.
                assert generation == GenerationMode.NEGATIVE
    assert_clean_log(gateway)


def assert_clean_log(gateway: Any) -> None:
    """No unhandled exception, no error-level line (a fuzz run must not produce any)."""
    bad = []
    for line in gateway.process.output().splitlines():
        if "Traceback" in line or "Uncaught exception" in line:
            bad.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("error", "critical") or "exc" in record:
            bad.append(line)
    assert not bad, "\n".join(bad[:10])


def test_openapi_json_is_the_yaml_file(gateway: Any) -> None:
    import yaml

    served = httpx.get(gateway.base_url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    document = yaml.safe_load((Path(__file__).parent.parent / "openapi.yaml").read_text())
    document.pop("x-templates", None)
    assert served.json() == json.loads(json.dumps(document))


def test_openapi_yaml_is_a_valid_description() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    import yaml

    document = yaml.safe_load((Path(__file__).parent.parent / "openapi.yaml").read_text())
    validator.validate(document)


def test_every_route_the_gateway_serves_is_described(gateway: Any) -> None:
    """A route added to the gateway without a description here fails this test."""
    documented = set(httpx.get(gateway.base_url + "/openapi.json", timeout=10).json()["paths"])
    probes = [
        "/v1/completions/anthropic-messages", "/v1/completions/anthropic", "/v1/completions/openai",
        "/v1/completions/fireworks", "/v1/completions/google", "/anthropic/v1/messages",
        "/openai/v1/chat/completions", "/v1/embeddings", "/v1/embeddings/models", "/openai/v1/embeddings",
        "/v1/limits", "/v1/limits/refresh", "/v1/attribution", "/-/__version", "/-/healthz",
        "/-/actor/sync-all-sources", "/-/flagged-requests", "/metrics", "/openapi.json",
    ]
    assert set(probes) - documented == set()
    # Routes answering something other than 404 to an unauthenticated GET are all documented.
    for path in probes:
        response = httpx.get(gateway.base_url + path, timeout=10)
        assert response.status_code != 404 or path == "/metrics", (path, response.status_code)
