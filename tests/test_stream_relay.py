"""The stream relay alone: flushing, backpressure and the in-band error, against a recording sink."""

from __future__ import annotations

import asyncio

from tornado.iostream import StreamClosedError

from handlers.relay import FLUSH_THRESHOLD, StreamRelay


class Sink:
    """Records writes and flushes; ``flush`` futures complete when ``drain`` is called."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.flushes = 0
        self.pending: list[asyncio.Future[None]] = []
        self.closed = False

    def write(self, chunk: bytes) -> None:
        self.written.append(chunk)

    def flush(self) -> asyncio.Future[None]:
        self.flushes += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        return future

    def drain(self, error: BaseException | None = None) -> None:
        for future in self.pending:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        self.pending.clear()


def relay_for(sink: Sink, *, auto_flush: bool = True, max_buffer: int = 1 << 20) -> StreamRelay:
    return StreamRelay(sink, lambda: sink.closed, auto_flush=auto_flush, max_buffer=max_buffer)


def test_first_chunk_flushes_at_once_later_ones_once_per_loop_iteration() -> None:
    async def run() -> None:
        sink = Sink()
        relay = relay_for(sink)
        assert relay.write(b"data: 1\n\n") and sink.flushes == 1 and relay.first_byte_sent
        for i in range(5):
            relay.write(b"data: %d\n\n" % i)
        assert sink.flushes == 1  # scheduled, not yet run
        await asyncio.sleep(0)
        assert sink.flushes == 2  # five chunks of one loop iteration, one flush
        assert b"".join(sink.written).count(b"data:") == 6

    asyncio.run(run())


def test_without_auto_flush_chunks_go_in_blocks() -> None:
    async def run() -> None:
        sink = Sink()
        relay = relay_for(sink, auto_flush=False)
        relay.write(b"x")
        for _ in range(10):
            relay.write(b"y" * 100)
        await asyncio.sleep(0)
        assert sink.flushes == 1  # 1,000 bytes: under the block size
        relay.write(b"z" * FLUSH_THRESHOLD)
        await asyncio.sleep(0)
        assert sink.flushes == 2

    asyncio.run(run())


def test_a_client_that_stops_reading_is_reported_once_past_the_buffer() -> None:
    async def run() -> None:
        sink = Sink()
        relay = relay_for(sink, max_buffer=10_000)
        assert relay.write(b"a" * 4_000)  # flushed at once, never acknowledged
        await asyncio.sleep(0)
        assert relay.write(b"b" * 4_000)
        assert not relay.write(b"c" * 4_000)  # 12,000 bytes owed to a client that reads nothing
        await asyncio.sleep(0)
        sink.drain()  # the client caught up
        await asyncio.sleep(0)
        assert relay.write(b"d")

    asyncio.run(run())


def test_the_in_band_error_is_an_event_of_its_own() -> None:
    async def run() -> None:
        sink = Sink()
        relay = relay_for(sink)
        relay.write(b'event: content_block_delta\ndata: {"partial')
        relay.in_band_error(b"event: error\ndata: {}\n\n")
        assert sink.written[-1] == b"\n\nevent: error\ndata: {}\n\n"
        ended = Sink()
        relay = relay_for(ended)
        relay.write(b"data: whole\n\n")
        relay.in_band_error(b"event: error\ndata: {}\n\n")
        assert ended.written[-1] == b"event: error\ndata: {}\n\n"

    asyncio.run(run())


def test_no_flush_once_the_client_is_gone_and_a_closed_stream_is_not_an_error() -> None:
    async def run() -> None:
        sink = Sink()
        relay = relay_for(sink)
        relay.write(b"data: 1\n\n")
        sink.drain(StreamClosedError())  # the client left mid-flush: quietly ignored
        sink.closed = True
        relay.write(b"data: 2\n\n")
        await asyncio.sleep(0)
        assert sink.flushes == 1

    asyncio.run(run())
