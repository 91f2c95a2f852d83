"""Fireworks through the real gateway: endpoint by feature, languageId removal, the
StarCoder single-tenant split, fine-tuned routing by languageId, the tracing header."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TOKEN_A, actor, limits
from tests.providers_support import (  # noqa: F401  (fixtures)
    WiredGateway,
    assert_json_error,
    gw,
    marker,
    post,
    received,
    sse_data,
    start_module_wired,
    start_wired,
)

pytestmark = pytest.mark.timeout(90)

ROUTE = "/v1/completions/fireworks"
FW_KEY = "fw-upstream-secret"
SG = "accounts/sourcegraph/models/"
# The reference's default Fireworks allowlist (4.13), fine-tuned variants included.
REFERENCE_MODELS = [
    "starcoder", SG + "starcoder2-15b", SG + "starcoder2-7b",
    "accounts/fireworks/models/starcoder-16b", "accounts/fireworks/models/starcoder-7b",
    "accounts/fireworks/models/starcoder-16b-w8a16", "accounts/fireworks/models/starcoder-7b-w8a16",
    SG + "starcoder-16b", "accounts/fireworks/models/mixtral-8x7b-instruct",
    "accounts/fireworks/models/starcoder-3b-w8a16", "accounts/fireworks/models/starcoder-1b-w8a16",
    SG + "deepseek-coder-7b-base",
    SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2", SG + "finetuned-fim-lang-py-model-deepseek-7b-stack-v2",
    "fim-lang-specific-model-deepseek-stack-trained",
    SG + "finetuned-fim-lang-ts-model-deepseek-7b-logs-v2", SG + "finetuned-fim-lang-js-model-deepseek-7b-logs-v2",
    SG + "finetuned-fim-lang-py-model-deepseek-7b-logs-v2", SG + "finetuned-fim-lang-tsx-jsx-model-deepseek-7b-logs-v2",
    "fim-lang-specific-model-deepseek-logs-trained",
]  # fmt: skip


@pytest.fixture(scope="module")
def shared(start_module_wired: Any) -> WiredGateway:
    return start_module_wired(env={"CODY_GATEWAY_FIREWORKS_ALLOWED_MODELS": ",".join(REFERENCE_MODELS)})


def test_code_completion_stream_goes_to_text_endpoint(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body: dict[str, Any] = {"model": "starcoder", "prompt": f"def f(): # {mark} fake:tokens=7", "stream": True, "max_tokens": 50,
                            "n": 4, "temperature": 0, "languageId": "python", "logprobs": 3, "echo": False, "stop": ["\n\n"]}
    response = post(gw, ROUTE, body, feature="code_completions", headers={"X-Sourcegraph-Actor-UID": "u"})
    assert response.status_code == 200, response.text
    # Enterprise StarCoder defaults to 100 % single tenant.
    assert response.headers["X-Cody-Resolved-Model"] == "fireworks/" + SG + "starcoder-16b"
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/inference/v1/completions"
    assert sent["body"] == {
        "prompt": body["prompt"], "model": SG + "starcoder-16b", "max_tokens": 50, "temperature": 0, "n": 1,
        "stream": True, "stop": ["\n\n"],
    }  # languageId, logprobs and the identifier are not forwarded
    assert sent["headers"]["authorization"] == f"Bearer {FW_KEY}"
    assert "x-fireworks-genie" not in sent["headers"]
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["model"] == "fireworks/" + SG + "starcoder-16b" and meta["feature"] == "code_completions"
    assert (meta["completion_token_count"], meta["stream"]) == (7, True)
    assert meta["prompt_character_count"] == len(body["prompt"])


def test_chat_goes_to_chat_endpoint_and_counts_chat_characters(gw: WiredGateway, fake_provider: Any) -> None:
    mark = marker()
    body: dict[str, Any] = {"model": "accounts/fireworks/models/mixtral-8x7b-instruct", "stream": False,
                            "messages": [{"role": "user", "content": f"hi {mark} fake:tokens=5"}]}
    response = post(gw, ROUTE, body, headers={"X-Fireworks-Genie": "true"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake provider"
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["path"] == "/inference/v1/chat/completions"
    assert sent["headers"]["x-fireworks-genie"] == "true"
    assert sent["body"] == {"messages": body["messages"], "model": body["model"]}
    meta = gw.event_for(response.headers["X-Trace"])["metadata"]
    assert meta["completion_character_count"] == len("Hello from the fake provider")
    assert meta["prompt_character_count"] == len(body["messages"][0]["content"])
    assert meta["completion_token_count"] == 5 and meta["prompt_token_count"] == 3


@pytest.mark.parametrize(
    ("model", "language", "resolved"),
    [
        ("fim-lang-specific-model-deepseek-stack-trained", "typescriptreact", SG + "finetuned-fim-lang-ts-like-model-deepseek-7b-stack-v2"),
        ("fim-lang-specific-model-deepseek-stack-trained", "python", SG + "finetuned-fim-lang-py-model-deepseek-7b-stack-v2"),
        ("fim-lang-specific-model-deepseek-logs-trained", "javascriptreact", SG + "finetuned-fim-lang-tsx-jsx-model-deepseek-7b-logs-v2"),
        ("fim-lang-specific-model-deepseek-logs-trained", "go", SG + "deepseek-coder-7b-base"),
        ("starcoder2-15b", "python", SG + "starcoder2-15b"),
    ],
)
def test_fine_tuned_model_routing_by_language(gw: WiredGateway, fake_provider: Any, model: str, language: str, resolved: str) -> None:
    mark = marker()
    response = post(gw, ROUTE, {"model": model, "languageId": language, "prompt": mark}, feature="code_completions")
    assert response.status_code == 200, response.text
    assert response.headers["X-Cody-Resolved-Model"] == f"fireworks/{resolved}"
    sent = received(fake_provider.base_url, mark)[-1]
    assert sent["body"]["model"] == resolved and "languageId" not in sent["body"]


def test_starcoder_split_follows_configuration(start_wired: Any, fake_provider: Any) -> None:
    gw = start_wired(env={
        "CODY_GATEWAY_FIREWORKS_STARCODER_ENTERPRISE_SINGLE_TENANT_PERCENT": "0",
        "CODY_GATEWAY_FIREWORKS_STARCODER_COMMUNITY_SINGLE_TENANT_PERCENT": "100",
    })  # fmt: skip
    resolved = post(gw, ROUTE, {"model": "starcoder", "prompt": "x"}, feature="code_completions").headers["X-Cody-Resolved-Model"]
    assert resolved == "fireworks/accounts/fireworks/models/starcoder-16b"


def test_virtual_names_admit_their_targets_only(start_wired: Any) -> None:
    only_virtual = [actor("v", TOKEN_A, code_completions=limits(100, "1h", models=["starcoder", "fim-lang-specific-model-deepseek-logs-trained"]))]
    gw = start_wired(only_virtual, env={"CODY_GATEWAY_FIREWORKS_ALLOWED_MODELS": ",".join(REFERENCE_MODELS)})
    assert post(gw, ROUTE, {"model": "starcoder", "prompt": "x"}, feature="code_completions").status_code == 200
    ok = post(gw, ROUTE, {"model": "fim-lang-specific-model-deepseek-logs-trained", "languageId": "python", "prompt": "x"}, feature="code_completions")
    assert ok.status_code == 200 and ok.headers["X-Cody-Resolved-Model"].endswith("py-model-deepseek-7b-logs-v2")
    body = assert_json_error(post(gw, ROUTE, {"model": SG + "starcoder2-15b", "prompt": "x"}, feature="code_completions"), 400, "is not allowed")
    assert body["error"].startswith(f'model "fireworks/{SG}starcoder2-15b" is not allowed, allowed: [fireworks/starcoder, ')
