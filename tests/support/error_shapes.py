"""The three error body shapes (SPEC point 1), checked strictly, and the message they carry."""

from __future__ import annotations

from typing import Any


def error_message(payload: Any, path: str) -> str:
    """The message of an error body answered on ``path``; asserts the body is in that route's shape."""
    if path.startswith("/anthropic/"):
        assert set(payload) == {"type", "error"} and payload["type"] == "error", payload
        error = payload["error"]
        assert set(error) == {"type", "message"}, payload
        assert error["type"] in {
            "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
            "rate_limit_error", "api_error", "overloaded_error",
        }, payload  # fmt: skip
    elif path.startswith("/openai/"):
        assert set(payload) == {"error"}, payload
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["type"], str), payload
    else:
        assert set(payload) == {"error"} and isinstance(payload["error"], str), payload
        return str(payload["error"])
    message = error["message"]
    assert isinstance(message, str), payload
    return message
