"""A real local HTTP server speaking the Sourcegraph-style GraphQL API of the actor sources.

It serves ``POST <path>?<OperationName>`` for CheckDotcomUserAccessToken,
CheckAccessToken, ListProductSubscriptions and SnippetAttribution from
fixture data, counts calls per operation, checks the service token, and can
go down (stop listening and drop connections), hang, answer 5xx or a GraphQL
error, and come back on the same port.

    fake = FakeGraphQL()
    await fake.start()
    fake.add_user(token, user_id=7, username="alice", chat=(100, 3600, ["anthropic/claude-2"]))
    ... GraphQLClient(api_url=fake.url, access_token=fake.service_token) ...
    await fake.stop()
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, TypedDict

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web

API_PATH = "/.api/graphql"

Limit = tuple[int, int, list[str]]  # (limit, intervalSeconds, allowedModels)


class Plan(TypedDict, total=False):
    """The per-feature limits add_user and add_subscription take, for passing as ``**plan``."""

    chat: Limit
    code: Limit
    embeddings: Limit


def relay_user_id(user_id: int) -> str:
    return base64.b64encode(f"User:{user_id}".encode()).decode()


def rate_limit(spec: Limit | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    limit, interval, models = spec
    return {"allowedModels": list(models), "source": "PLAN", "limit": limit, "intervalSeconds": interval}


def access(enabled: bool, chat: Limit | None, code: Limit | None, embeddings: Limit | None) -> dict[str, Any]:
    return {
        "enabled": enabled,
        "chatCompletionsRateLimit": rate_limit(chat),
        "codeCompletionsRateLimit": rate_limit(code),
        "embeddingsRateLimit": rate_limit(embeddings),
    }


@dataclass
class Seen:
    operation: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw_query: str


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeGraphQL) -> None:
        self.fake = fake

    async def post(self) -> None:
        status, payload = await self.fake.handle(self.request)
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload) if not isinstance(payload, str) else payload)


class FakeGraphQL:
    def __init__(self, service_token: str = "sgs-service-token") -> None:
        self.service_token = service_token
        self.users: dict[str, dict[str, Any]] = {}
        self.subscriptions: list[dict[str, Any]] = []
        self.attribution: dict[str, Any] = {"totalCount": 0, "limitHit": False, "nodes": []}
        self.calls: Counter[str] = Counter()
        self.seen: list[Seen] = []
        # "up", "http500", "hang"; per-operation GraphQL error codes in ``fail_with``.
        self.mode = "up"
        self.fail_with: dict[str, str] = {}
        self.port = 0
        self._server: tornado.httpserver.HTTPServer | None = None
        self._release = asyncio.Event()
        self.hanging = 0

    # --- fixture data ------------------------------------------------------------

    def add_user(
        self,
        token: str,
        *,
        user_id: int,
        username: str,
        enabled: bool = True,
        chat: Limit | None = None,
        code: Limit | None = None,
        embeddings: Limit | None = None,
        relay_id: str | None = None,
    ) -> None:
        self.users[token] = {
            "id": relay_id if relay_id is not None else relay_user_id(user_id),
            "username": username,
            "codyGatewayAccess": access(enabled, chat, code, embeddings),
        }

    def add_subscription(
        self,
        uuid: str,
        tokens: list[str],
        *,
        username: str = "",
        tags: list[str] | None = None,
        enabled: bool = True,
        archived: bool = False,
        chat: Limit | None = None,
        code: Limit | None = None,
        embeddings: Limit | None = None,
    ) -> dict[str, Any]:
        sub = {
            "id": base64.b64encode(f"ProductSubscription:{uuid}".encode()).decode(),
            "uuid": uuid,
            "account": {"username": username} if username else None,
            "isArchived": archived,
            "codyGatewayAccess": access(enabled, chat, code, embeddings),
            "activeLicense": {"info": {"tags": list(tags or [])}},
            "sourcegraphAccessTokens": list(tokens),
        }
        self.subscriptions.append(sub)
        return sub

    def remove_subscription(self, uuid: str) -> None:
        self.subscriptions = [s for s in self.subscriptions if s["uuid"] != uuid]

    # --- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PATH}"

    async def start(self) -> None:
        app = tornado.web.Application([(API_PATH, _Handler, {"fake": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        sockets = tornado.netutil.bind_sockets(self.port, "127.0.0.1", family=socket.AF_INET)
        self.port = sockets[0].getsockname()[1]
        self._server.add_sockets(sockets)
        self._release = asyncio.Event()

    async def go_down(self) -> None:
        """Stop listening and drop open connections: clients get connection errors."""
        self._release.set()
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            await server.close_all_connections()

    async def come_back(self) -> None:
        self.mode = "up"
        if self._server is None:
            await self.start()
        else:
            self._release.set()
            self._release = asyncio.Event()

    async def stop(self) -> None:
        await self.go_down()

    # --- request handling ----------------------------------------------------------

    async def handle(self, request: tornado.httputil.HTTPServerRequest) -> tuple[int, Any]:
        operation = request.query
        if request.headers.get("Authorization") != f"token {self.service_token}":
            return 401, {"errors": [{"message": "invalid service token"}]}
        try:
            body = json.loads(request.body or b"{}")
        except ValueError:
            return 400, {"errors": [{"message": "body is not JSON"}]}
        self.calls[operation] += 1
        self.seen.append(Seen(operation, dict(request.headers), body, request.query))
        if f"query {operation}" not in str(body.get("query", "")):
            return 400, {"errors": [{"message": f"query does not match operation {operation}"}]}
        if self.mode == "hang":
            self.hanging += 1
            try:
                await self._release.wait()
            finally:
                self.hanging -= 1
            return 503, {"errors": [{"message": "released"}]}
        if self.mode == "http500":
            return 500, "internal error"
        if operation in self.fail_with:
            code = self.fail_with[operation]
            return 200, {"data": None, "errors": [{"message": f"failure {code}", "extensions": {"code": code}}]}
        variables = body.get("variables") or {}
        if operation == "CheckDotcomUserAccessToken":
            user = self.users.get(variables.get("token", ""))
            if user is None:
                return 200, _not_found("codyGatewayDotcomUserByToken", "ErrDotcomUserNotFound", "user not found")
            return 200, {"data": {"dotcom": {"codyGatewayDotcomUserByToken": user}}}
        if operation == "CheckAccessToken":
            token = variables.get("token", "")
            for sub in self.subscriptions:
                if token in sub["sourcegraphAccessTokens"]:
                    state = {k: v for k, v in sub.items() if k != "sourcegraphAccessTokens"}
                    return 200, {"data": {"dotcom": {"productSubscriptionByAccessToken": state}}}
            return 200, _not_found(
                "productSubscriptionByAccessToken", "ErrProductSubscriptionNotFound", "product subscription not found"
            )
        if operation == "ListProductSubscriptions":
            nodes = [dict(s) for s in self.subscriptions]
            return 200, {"data": {"dotcom": {"productSubscriptions": {
                "totalCount": len(nodes),
                "pageInfo": {"endCursor": None, "hasNextPage": False},
                "nodes": nodes,
            }}}}
        if operation == "SnippetAttribution":
            result = dict(self.attribution)
            result["nodes"] = list(result.get("nodes", []))[: int(variables.get("limit") or 0)]
            return 200, {"data": {"snippetAttribution": result}}
        return 400, {"errors": [{"message": f"unknown operation {operation!r}"}]}


def _not_found(field: str, code: str, message: str) -> dict[str, Any]:
    return {
        "data": {"dotcom": {field: None}},
        "errors": [{"message": message, "path": ["dotcom", field], "extensions": {"code": code}}],
    }


class FakeGraphQLThread:
    """The fake on its own event loop in a thread, for tests that talk to a gateway process.

    ``call(fn)`` runs a plain function (fixture edits) on the fake's loop;
    ``run(coro_fn)`` runs a coroutine function there (go_down, come_back).
    """

    def __init__(self, service_token: str = "sgs-service-token") -> None:
        import threading

        self.fake = FakeGraphQL(service_token)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-graphql", daemon=True)
        self._thread.start()
        self.run(self.fake.start)

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def service_token(self) -> str:
        return self.fake.service_token

    def run(self, coro_fn: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def call(self, fn: Any, timeout: float = 10.0) -> Any:
        async def wrapper() -> Any:
            return fn(self.fake)

        return self.run(wrapper, timeout)

    def calls(self, operation: str) -> int:
        return int(self.call(lambda fake: fake.calls[operation]))

    def stop(self) -> None:
        try:
            self.run(self.fake.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
