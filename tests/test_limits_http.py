"""GET /v1/limits and POST /v1/limits/refresh through the real server (in-process limiter)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import TOKEN_A, actor, limits
from tests.test_anthropic_messages import message_body, post


def get_limits(gw: Any, token: str | None = TOKEN_A) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(gw.base_url + "/v1/limits", headers=headers, timeout=10)


def test_limits_lists_only_valid_features_with_usage(start_gateway: Any) -> None:
    gw = start_gateway(
        [
            actor(
                "partial",
                TOKEN_A,
                chat_completions=limits(10, "24h", ["anthropic/claude-3-haiku-20240307"], concurrentRequests=3),
                code_completions=limits(100, "1h", tokensLimit=5000),
            )
        ]
    )
    before = get_limits(gw).json()
    assert set(before) == {"chat_completions", "code_completions"}  # no embeddings limit: omitted, no 403
    chat = before["chat_completions"]
    assert chat["limit"] == 10 and chat["interval"] == "24h0m0s" and chat["usage"] == 0
    assert chat["remaining"] == 10 and "expiry" not in chat
    assert chat["allowedModels"] == ["anthropic/claude-3-haiku-20240307"]
    assert chat["concurrentRequests"] == 3 and chat["inFlight"] == 0
    assert before["code_completions"]["interval"] == "1h0m0s"
    assert before["code_completions"]["tokensLimit"] == 5000

    assert post(gw, message_body()).status_code == 200
    after = get_limits(gw).json()["chat_completions"]
    assert after["usage"] == 1 and after["remaining"] == 9 and after["expiry"].endswith("Z")


def test_limits_needs_a_known_actor(start_gateway: Any) -> None:
    gw = start_gateway()
    response = get_limits(gw, token="unknown-token")
    assert response.status_code == 401 and "error" in response.json()


def test_refresh_of_a_static_actor_is_a_no_op(start_gateway: Any) -> None:
    gw = start_gateway()
    response = httpx.post(gw.base_url + "/v1/limits/refresh", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10)
    assert response.status_code == 200 and response.text == ""
