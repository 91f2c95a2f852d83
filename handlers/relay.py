"""Writing a relayed upstream body to the client: flushes, backpressure, the in-band error.

curl hands over chunks as they arrive and offers no backpressure; the client
may read slower than the model writes. ``StreamRelay`` writes each chunk,
flushes the first at once and the rest per loop iteration (or in 4 KB
blocks without auto-flush), and reports a client that fell more than
``max_buffer`` bytes behind, so the caller can end the stream instead of
holding an unbounded backlog. Once the first byte is out the status can no
longer change: a later failure is told in-band, as an event of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

log = logging.getLogger("gateway.completions")

# Without auto-flush, relay in blocks of this size (as Go's http server does).
FLUSH_THRESHOLD = 4096


class ClientSink(Protocol):
    """The client side of a response (a RequestHandler's write and flush)."""

    def write(self, chunk: bytes) -> None: ...

    def flush(self) -> Any: ...


class StreamRelay:
    __slots__ = (
        "_sink", "_closed", "_auto_flush", "_max_buffer", "_flush_scheduled", "_unflushed", "_pending",
        "first_byte_sent", "last_chunk",
    )  # fmt: skip

    def __init__(self, sink: ClientSink, closed: Callable[[], bool], *, auto_flush: bool, max_buffer: int) -> None:
        self._sink = sink
        self._closed = closed
        self._auto_flush = auto_flush
        self._max_buffer = max_buffer
        self._flush_scheduled = False
        self._unflushed = 0
        self._pending = 0
        self.first_byte_sent = False
        self.last_chunk = b""

    def detach(self) -> None:
        """Forget the sink once the response is over.

        The sink (the handler) holds this relay, so the two form a reference
        cycle that only the garbage collector could free; with a request's
        whole object graph hanging from it, those collections were a loop
        stall of tens of milliseconds and several percent of the CPU. A flush
        still scheduled finds the relay closed.
        """
        self._closed = _always_closed
        self._sink = _CLOSED_SINK

    def write(self, chunk: bytes) -> bool:
        """Relay ``chunk``; False once the client is more than ``max_buffer`` bytes behind."""
        self.last_chunk = chunk
        self._sink.write(chunk)
        self._unflushed += len(chunk)
        if not self.first_byte_sent:
            self.first_byte_sent = True
            self._flush()
        elif (self._auto_flush or self._unflushed >= FLUSH_THRESHOLD) and not self._flush_scheduled:
            # Chunks curl delivers in one loop iteration share one flush (one send).
            self._flush_scheduled = True
            IOLoop.current().add_callback(self._flush)
        return self._pending + self._unflushed <= self._max_buffer

    def in_band_error(self, event: bytes) -> None:
        """Write a provider-shaped error event after what was relayed."""
        last = self.last_chunk
        # The stream may have stopped mid-event: end that event first so the
        # error is an event of its own.
        ended = not last or last.endswith((b"\n\n", b"\r\n\r\n"))
        self._sink.write(event if ended else b"\n\n" + event)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed():
            return
        amount = self._unflushed
        self._unflushed = 0
        self._pending += amount
        future = self._sink.flush()

        def flushed(f: Any) -> None:
            self._pending -= amount
            exc = f.exception()
            if exc is not None and not isinstance(exc, StreamClosedError):
                log.warning("flush failed: %s", exc)

        future.add_done_callback(flushed)


def _always_closed() -> bool:
    return True


class _ClosedSink:
    """Where a detached relay writes: nowhere (the response is over)."""

    def write(self, chunk: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


_CLOSED_SINK = _ClosedSink()
