"""The gateway's one error hierarchy.

Anything below the handlers raises one of these; the base handler's
``write_error`` is the only place that turns them into an HTTP response
(JSON ``{"error": message}``). ``str(err)`` is the client-safe message.

    GatewayError (500)
    ├── BadRequest (400)
    │   └── PayloadTooLarge (413)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    ├── NotFound (404)
    ├── MethodNotAllowed (405)
    ├── RateLimited (429)            carries the limiter's headers
    ├── UpstreamError (502)          transport failure talking to a provider
    ├── ServiceUnavailable (503)     actor source down, circuit open, upstream 429
    └── UpstreamTimeout (504)        X-Timeout-Ms elapsed or the upstream stalled
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


# The SDK routes answer errors in the SDK's own shape, so that the SDK's
# exception text carries the gateway's message (SPEC point 1).
NATIVE, ANTHROPIC, OPENAI = "native", "anthropic", "openai"

_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_style(path: str) -> str:
    if path.startswith("/anthropic/"):
        return ANTHROPIC
    if path.startswith("/openai/"):
        return OPENAI
    return NATIVE


def error_payload(style: str, status: int, message: str) -> dict[str, object]:
    """The JSON body of an error answer in ``style`` (NATIVE, ANTHROPIC or OPENAI)."""
    if style == ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if style == OPENAI:
        kind = _OPENAI_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}
