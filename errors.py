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
