"""The HTTP server, bounded: never more client connections than descriptors allow.

Tornado's accept loop raises on EMFILE and is called again at once, since
the listening socket stays readable: with the descriptors exhausted by idle
connections it spins, logging each failure (measured: 142,369 error lines
in 11 s, 65 % of a core, legitimate requests timing out). Here:

* the soft RLIMIT_NOFILE is raised to the hard limit at start;
* client connections are capped below it (``server.max_connections``, or
  derived: half of what is left after a reserve, since every proxied
  request also holds an upstream descriptor);
* at the cap, the connection that has waited longest for a request is
  closed to make room; connections in the middle of a request never are;
  with none idle, accepting pauses until a connection closes (or briefly);
* an accept that fails for lack of descriptors or memory pauses accepting
  for a moment, and the condition is logged once per interval.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

log = logging.getLogger("gateway.server")

# Descriptors kept for everything but client connections: the event journal,
# Redis, the OTLP exporter, log files, the listening sockets.
RESERVED_FDS = 128
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PAUSE_S = 0.1
_LOG_INTERVAL_S = 10.0
_ACCEPTS_PER_EVENT = 128


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one where allowed; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def derived_max_connections(fd_limit: int) -> int:
    return max(16, (fd_limit - RESERVED_FDS) // 2)


def _nothing() -> None:
    pass


class _Tracked(httputil.HTTPMessageDelegate):
    """Marks its connection busy from the request's headers until the next request begins."""

    __slots__ = ("_server", "_connection", "_delegate")

    def __init__(self, server: BoundedHTTPServer, connection: Any, delegate: httputil.HTTPMessageDelegate) -> None:
        self._server = server
        self._connection = connection
        self._delegate = delegate

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self._server._idle.pop(self._connection, None)
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        self._delegate.finish()

    def on_connection_close(self) -> None:
        self._delegate.on_connection_close()


class BoundedHTTPServer(HTTPServer):
    def initialize(self, *args: Any, max_connections: int = 0, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections or derived_max_connections(raise_fd_limit())
        # Connections waiting for their next request, longest-waiting first.
        self._idle: dict[Any, float] = {}
        self._listening: list[socket.socket] = []
        self._accepting = False
        self._pause_handle: object | None = None
        self._last_log = -_LOG_INTERVAL_S
        self.shed = 0
        self.accept_failures = 0

    # -- accepting -------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            # TCPServer.stop calls these; accepting is ours (``_pause``).
            self._handlers[sock.fileno()] = _nothing
            self._listening.append(sock)
        self._resume()

    def _resume(self) -> None:
        if self._accepting or not self._listening:
            return
        self._accepting = True
        loop = IOLoop.current()
        for sock in self._listening:
            loop.add_handler(sock, self._on_acceptable, IOLoop.READ)

    def _pause(self, for_s: float | None = None) -> None:
        if self._accepting:
            self._accepting = False
            loop = IOLoop.current()
            for sock in self._listening:
                loop.remove_handler(sock)
        if for_s is not None and self._pause_handle is None:
            self._pause_handle = IOLoop.current().call_later(for_s, self._pause_ended)

    def _pause_ended(self) -> None:
        self._pause_handle = None
        self._resume()

    def _on_acceptable(self, sock: socket.socket, _events: int) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            if not self._accepting:
                return
            if len(self._connections) >= self.max_connections and not self._shed_one():
                # Just-accepted connections count as idle only once their first read
                # begins: look again shortly (or as soon as a connection closes).
                self._note("at the connection cap (%d), none idle: accepting paused", self.max_connections)
                self._pause(_PAUSE_S)
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self.accept_failures += 1
                self._shed_one()
                self._note("accept failed (%s): accepting paused for %.1f s", exc.strerror, _PAUSE_S)
                self._pause(_PAUSE_S)
                return
            self._handle_connection(connection, address)

    def _shed_one(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        if not self._idle:
            return False
        connection = next(iter(self._idle))
        del self._idle[connection]
        self.shed += 1
        connection.stream.close()
        return True

    def _note(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL_S:
            self._last_log = now
            log.warning(message + " (%d shed, %d failed accepts so far)", *args, self.shed, self.accept_failures)

    # -- connections -----------------------------------------------------------

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # A connection starts waiting for its next request here (its first, or after a response).
        self._idle.pop(server_conn, None)
        self._idle[server_conn] = time.monotonic()
        return _Tracked(self, server_conn, super().start_request(server_conn, request_conn))

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        self._idle.pop(server_conn, None)
        if not self._accepting and self._pause_handle is None and len(self._connections) < self.max_connections:
            self._resume()

    def stop(self) -> None:
        if self._accepting:
            self._pause()
        if self._pause_handle is not None:
            IOLoop.current().remove_timeout(self._pause_handle)
            self._pause_handle = None
        self._listening = []
        super().stop()
