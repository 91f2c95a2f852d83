"""Build the gateway's redis.asyncio client from ``REDIS_ENDPOINT``.

Accepted endpoints:
    redis://[user:password@]host:port/db        one server
    rediss://...                                one server over TLS
    unix:///path/to/socket?db=N                 one server on a unix socket
    redis+cluster://[user:password@]host:port[,host:port...]   Redis Cluster (seed nodes)
    rediss+cluster://...                        Redis Cluster over TLS

The client does no I/O until its first command. Whoever calls ``connect``
owns the client and closes it with ``await client.aclose()``.

``lean_client`` turns a single-node client from ``connect`` into the
limiter's own RESP2 client (redisconn/resp.py) for the same server, database,
credentials, TLS settings and timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import RedisSSLContext, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from redisconn.resp import RespAddress, RespClient

_SINGLE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def _retry_once_on_connection_error() -> Retry:
    # One immediate retry repairs a pooled connection that went stale (Redis
    # restarted); timeouts are not retried, so a slow Redis costs one timeout.
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


class BoundedRedisCluster(RedisCluster):
    """A RedisCluster that waits for a free connection instead of failing.

    redis-py's cluster client raises MaxConnectionsError as soon as one
    node's pool is exhausted; a hot bucket sends every call to one node.
    Bounding the commands in flight to ``max_connections`` (the per-node
    pool size) makes callers queue, for at most ``pool_timeout_s``.
    It also discovers the cluster before the first command runs.
    """

    def __init__(self, *args: Any, pool_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._pool_timeout_s = pool_timeout_s

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py picks a command's routing policy before it discovers the
        # cluster, so commands issued concurrently on a cold client get routed
        # wrongly and poison the pool; discovering first (once, under the
        # client's own lock; a no-op afterwards) avoids that.
        await self.initialize()
        try:
            async with asyncio.timeout(self._pool_timeout_s):
                await self._in_flight.acquire()
        except TimeoutError:
            raise RedisConnectionError("no Redis cluster connection available") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


def _parse_nodes(netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    credentials, _, hosts = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if credentials:
        user, sep, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = item.strip(), "6379"
        nodes.append((host.strip("[]"), int(port)))
    return username, password, nodes


def connect(endpoint: str, *, timeout_ms: int, max_connections: int) -> Redis | RedisCluster:
    """A client for ``endpoint`` with short timeouts and a bounded, waiting pool.

    ``timeout_ms`` bounds connecting, each socket read/write, and the wait
    for a free pooled connection.
    """
    timeout_s = timeout_ms / 1000.0
    scheme = urlsplit(endpoint).scheme.lower()
    if scheme in _SINGLE_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            endpoint,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            retry=_retry_once_on_connection_error(),
        )
        return Redis.from_pool(pool)
    if scheme in _CLUSTER_SCHEMES:
        parts = urlsplit(endpoint)
        username, password, nodes = _parse_nodes(parts.netloc)
        if not nodes or not nodes[0][0]:
            raise ValueError("a redis+cluster:// endpoint needs at least one host:port")
        return BoundedRedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            username=username,
            password=password,
            ssl=scheme.startswith("rediss"),
            max_connections=max_connections,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_keepalive=True,
            retry=_retry_once_on_connection_error(),
            pool_timeout_s=timeout_s,
        )
    # Never echo the endpoint: it may carry a password.
    raise ValueError(
        f"unsupported Redis endpoint scheme {scheme!r}: "
        "use redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    )


def lean_client(client: Redis) -> RespClient:
    """A RespClient for the server ``client`` (a single-node redis.asyncio.Redis) talks to.

    Reading redis-py's parsed connection settings, rather than the URL again,
    keeps one parser of endpoint URLs. TLS uses redis-py's own context builder
    with SSLConnection's defaults (certificate required, hostname checked), so
    verification is the same as on redis-py's connections.
    """
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if kwargs.get("credential_provider") is not None:
        raise ValueError("the limiter's Redis client supports a username and password, not a credential provider")
    ssl_context = None
    if issubclass(pool.connection_class, SSLConnection):
        ssl_context = RedisSSLContext(
            keyfile=kwargs.get("ssl_keyfile"),
            certfile=kwargs.get("ssl_certfile"),
            cert_reqs=kwargs.get("ssl_cert_reqs", "required"),
            include_verify_flags=kwargs.get("ssl_include_verify_flags"),
            exclude_verify_flags=kwargs.get("ssl_exclude_verify_flags"),
            ca_certs=kwargs.get("ssl_ca_certs"),
            ca_data=kwargs.get("ssl_ca_data"),
            ca_path=kwargs.get("ssl_ca_path"),
            check_hostname=kwargs.get("ssl_check_hostname", True),
            min_version=kwargs.get("ssl_min_version"),
            ciphers=kwargs.get("ssl_ciphers"),
            password=kwargs.get("ssl_password"),
        ).get()
    address = RespAddress(
        host=kwargs.get("host", "localhost"),
        port=int(kwargs.get("port", 6379)),
        path=kwargs["path"] if issubclass(pool.connection_class, UnixDomainSocketConnection) else None,
        db=int(kwargs.get("db", 0)),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        ssl_context=ssl_context,
    )
    timeout_s = kwargs.get("socket_timeout") or 5.0
    return RespClient(address, timeout_s=timeout_s, connect_timeout_s=kwargs.get("socket_connect_timeout") or timeout_s)
