"""What an open stream holds: the objects that live as long as it stay small.

Thousands of streams stay open at once, so each object a stream keeps is
memory multiplied by thousands. Two CPython details matter here: an
instance dict of more than 30 keys loses key sharing (1.6 KB instead of a
few hundred bytes), and a slotted object has no dict at all.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from collections.abc import Callable

import httpx
import pytest

from fakes.processes import wait_until
from handlers.completions import CompletionsHandler
from tests.conftest import TOKEN_A, actor
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway
from upstreams.transport import _SlottedHTTPRequest

MODEL = "claude-3-haiku-20240307"


def test_the_upstream_request_keeps_its_attributes_in_slots() -> None:
    request = _SlottedHTTPRequest("http://127.0.0.1:9/v1/messages", method="POST", body=b"{}", headers={"a": "b"})
    # Every attribute Tornado's HTTPRequest sets has a slot: none spilled into a dict.
    assert request.__dict__ == {}
    assert request.method == "POST" and request.body == b"{}" and request.headers["a"] == "b"


@pytest.fixture
def gw(observed_gateway: Callable[..., InProcessGateway]) -> InProcessGateway:
    return observed_gateway([actor("actor-a", TOKEN_A)])


def test_an_open_stream_holds_a_small_handler_and_no_copy_of_its_prompt(gw: InProcessGateway) -> None:
    prompt = "remember this prompt " * 2000 + "fake:tokens=30 fake:tokens_per_s=10"
    body = {"model": MODEL, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    first_event = threading.Event()
    done = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST",
            gw.base_url + "/v1/completions/anthropic-messages",
            content=json.dumps(body),
            headers={"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"},
            timeout=30,
        ) as response:
            assert response.status_code == 200
            for _ in response.iter_bytes():
                first_event.set()
        done.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first_event.wait(10)
    handlers = gw.call(_open_handlers)
    assert len(handlers) == 1
    sizes = handlers[0]
    # Only Tornado's own attributes are in the instance dict (ours are in slots),
    # far from the 30 keys past which CPython stops sharing keys (1.6 KB a dict).
    assert sizes["dict_keys"] <= 20, sizes
    assert sizes["dict_bytes"] < 1000, sizes
    # The request body was handed over, not kept by the handler for the stream's life.
    assert sizes["body_bytes"] == 0, sizes
    wait_until(done.is_set, timeout=20, what="the stream to end")
    client.join(5)


def _open_handlers() -> list[dict[str, int]]:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, CompletionsHandler) and not obj._finished:
            body = obj._body
            found.append(
                {
                    "dict_keys": len(obj.__dict__),
                    "dict_bytes": sys.getsizeof(obj.__dict__),
                    "body_bytes": len(body) if body is not None else 0,
                }
            )
    return found
