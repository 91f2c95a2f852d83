"""Probes (/-/readyz, /-/livez) and the SDK error shapes, through the real server."""

from __future__ import annotations

import json
import signal
from typing import Any

import anthropic
import httpx
import openai
import pytest

from fakes.processes import GatewayProcess
from tests.conftest import TOKEN_A, actor, limits

MODEL = "claude-3-haiku-20240307"


def test_probes_answer_without_credentials_or_details(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway()
    for path in ("/-/readyz", "/-/livez"):
        response = httpx.get(gw.base_url + path, timeout=10)
        assert response.status_code == 200, response.text
        assert response.text == "ok"
        assert response.headers.get("X-Trace")
    # Health keeps its secret.
    assert httpx.get(gw.base_url + "/-/healthz", timeout=10).status_code == 401


def test_readyz_reports_draining_on_a_kept_alive_connection(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(env={"CODY_GATEWAY_SERVER_DRAIN_TIMEOUT_S": "20"})
    body = {
        "model": MODEL, "max_tokens": 100, "stream": True,
        "messages": [{"role": "user", "content": "slow fake:tokens=40 fake:tokens_per_s=8"}],
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
    with httpx.Client(base_url=gw.base_url, timeout=30) as probe:
        assert probe.get("/-/readyz").status_code == 200  # keeps this connection open
        with httpx.stream("POST", gw.base_url + "/v1/completions/anthropic-messages", json=body, headers=headers, timeout=30) as r:
            chunks = r.iter_bytes()
            next(chunks)
            gw.process.signal(signal.SIGTERM)
            gw.process.wait_for("shutting down", timeout=10)
            answer = probe.get("/-/readyz")
            assert answer.status_code == 503, answer.text
            assert answer.text == "draining"
            assert probe.get("/-/livez").status_code == 200
            assert b"message_stop" in b"".join(chunks)  # the stream itself ends normally


def test_sdk_exceptions_carry_the_gateway_message(start_gateway: Any) -> None:
    gw: GatewayProcess = start_gateway(actors=[actor("actor-a", TOKEN_A, chat_completions=limits(models=["anthropic/claude-3-haiku-20240307"]))])
    client = anthropic.Anthropic(base_url=gw.base_url + "/anthropic", api_key=TOKEN_A, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="claude-3-opus-20240229", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert 'model "anthropic/claude-3-opus-20240229" is not allowed' in str(info.value)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": info.value.body["error"]["message"]},  # type: ignore[index]
    }
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=gw.base_url + "/anthropic", api_key="sgd_" + "f" * 64, max_retries=0).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    oai = openai.OpenAI(base_url=gw.base_url + "/openai/v1", api_key=TOKEN_A, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "is not allowed" in str(bad.value)
    # The native routes keep the reference's shape.
    native = httpx.post(gw.base_url + "/v1/completions/anthropic-messages", content=json.dumps({"model": "x"}),
                        headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10)  # fmt: skip
    assert native.status_code == 400 and set(native.json()) == {"error"}
