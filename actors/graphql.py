"""A small client for the Sourcegraph-style GraphQL API the remote actor sources use.

One POST per operation to ``<api_url>?<OperationName>`` (the reference's
wire shape: the raw query string is the operation name), authenticated as
a service account with ``Authorization: token <value>``. Every call has a
bounded timeout, and every failure becomes one of the typed errors below,
so callers decide between "the service said no" and "the service is down"
without looking at HTTP details.

The client also remembers whether the service is currently failing, so the
sources can serve cached actors without waiting on a dead service again,
and so the outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

log = logging.getLogger("gateway.actors.graphql")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
# Enough for an error message worth logging, never a whole HTML error page.
_MAX_ERROR_TEXT = 200


class GraphQLError(Exception):
    """Any failure of a GraphQL call."""


class GraphQLUnavailable(GraphQLError):
    """The service could not be reached, timed out, or answered 5xx/429: try again later."""


class GraphQLHTTPError(GraphQLError):
    """A non-200 answer that is not an outage (e.g. 401: our service token is wrong)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GraphQLProtocolError(GraphQLError):
    """A 200 whose body is not a GraphQL response."""


class GraphQLResponseError(GraphQLError):
    """The service answered with a GraphQL ``errors`` list."""

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        self.errors = list(errors)
        messages = "; ".join(str(e.get("message") or "unknown error") for e in self.errors) or "unknown error"
        super().__init__(f"graphql: {messages}")

    @property
    def codes(self) -> list[str]:
        out: list[str] = []
        for err in self.errors:
            extensions = err.get("extensions")
            if isinstance(extensions, Mapping) and isinstance(extensions.get("code"), str):
                out.append(extensions["code"])
        return out

    def has_code(self, code: str) -> bool:
        return code in self.codes


class GraphQLClient:
    """Shared by every source and the attribution search; safe for concurrent use."""

    def __init__(
        self,
        http_client: AsyncHTTPClient,
        *,
        api_url: str,
        access_token: str,
        client_id: str = "",
        environment: str = "dev",
        version: str = "dev",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http_client
        self._api_url = api_url
        self._timeout = timeout_s
        self._connect_timeout = min(connect_timeout_s, timeout_s)
        self._clock = clock
        headers = {
            "Authorization": f"token {access_token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"Cody-Gateway/{environment} {version}",
        }
        if client_id:
            headers["X-Sourcegraph-Client-Id"] = client_id
        self._headers = headers
        self._failing_since: float | None = None
        self._last_failure: float | None = None
        # Calls by (operation, outcome); the lead can export these as metrics.
        self.calls: Counter[tuple[str, str]] = Counter()

    def url_for(self, operation: str) -> str:
        parts = urlsplit(self._api_url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, operation, ""))

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def failed_within(self, window_s: float) -> bool:
        """True when the last call failed as an outage less than ``window_s`` ago."""
        return (
            self._failing_since is not None
            and self._last_failure is not None
            and self._clock() - self._last_failure < window_s
        )

    async def query(self, operation: str, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run one operation and return its ``data`` object; raise a GraphQLError otherwise."""
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        request = HTTPRequest(
            self.url_for(operation),
            method="POST",
            body=body,
            headers=self._headers,
            connect_timeout=self._connect_timeout,
            request_timeout=self._timeout,
            follow_redirects=False,
        )
        try:
            try:
                response = await asyncio.wait_for(
                    self._http.fetch(request, raise_error=False), timeout=self._timeout + 1.0
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, DNS, timeout: all mean "not reachable now"
                raise GraphQLUnavailable(f"{operation}: Sourcegraph API unreachable: {_describe(exc)}") from exc
            data = self._parse(operation, response.code, response.body or b"")
        except GraphQLUnavailable:
            self._record(operation, "unavailable", down=True)
            raise
        except GraphQLError as exc:
            outcome = "graphql_error" if isinstance(exc, GraphQLResponseError) else "error"
            self._record(operation, outcome, down=False)
            raise
        self._record(operation, "ok", down=False)
        return data

    def _parse(self, operation: str, status: int, body: bytes) -> dict[str, Any]:
        if status == 599 or status >= 500 or status == 429:
            detail = f"HTTP {status}" if status != 599 else "connection failed"
            raise GraphQLUnavailable(f"{operation}: Sourcegraph API unavailable: {detail}")
        if status != 200:
            text = body[:_MAX_ERROR_TEXT].decode("utf-8", "replace")
            raise GraphQLHTTPError(status, f"{operation}: Sourcegraph API answered HTTP {status}: {text}")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise GraphQLProtocolError(f"{operation}: response is not JSON") from exc
        if not isinstance(payload, dict):
            raise GraphQLProtocolError(f"{operation}: response is not a JSON object")
        errors = payload.get("errors")
        if errors:
            if not isinstance(errors, list):
                raise GraphQLProtocolError(f"{operation}: malformed errors list")
            raise GraphQLResponseError([e if isinstance(e, dict) else {"message": str(e)} for e in errors])
        data = payload.get("data")
        if not isinstance(data, dict):
            raise GraphQLProtocolError(f"{operation}: response has no data")
        return data

    def _record(self, operation: str, outcome: str, *, down: bool) -> None:
        self.calls[(operation, outcome)] += 1
        now = self._clock()
        if down:
            self._last_failure = now
            if self._failing_since is None:
                self._failing_since = now
                log.warning("Sourcegraph GraphQL API is unavailable; serving cached actors until it is back")
        elif self._failing_since is not None:
            log.warning(
                "Sourcegraph GraphQL API is reachable again after %.1fs", now - self._failing_since
            )
            self._failing_since = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:_MAX_ERROR_TEXT]
