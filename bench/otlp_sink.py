"""A do-nothing OTLP/HTTP trace collector, so benchmarks pay for span export.

Without an endpoint the gateway still records spans but never serialises or
sends them; pointing it here makes "tracing on" include the exporter's
protobuf encoding and HTTP posts, as in production. It answers every POST
with an empty ExportTraceServiceResponse (an empty protobuf message is zero
bytes) and counts what it got.

    python bench/otlp_sink.py --port 0     # prints "otlp sink listening on http://..."
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import tornado.httpserver
import tornado.netutil
import tornado.web


class _Counts:
    def __init__(self) -> None:
        self.posts = 0
        self.bytes = 0


class TracesHandler(tornado.web.RequestHandler):
    def initialize(self, counts: _Counts) -> None:
        self.counts = counts

    def post(self) -> None:
        self.counts.posts += 1
        self.counts.bytes += len(self.request.body)
        self.set_header("Content-Type", "application/x-protobuf")
        self.finish(b"")


class StatsHandler(tornado.web.RequestHandler):
    def initialize(self, counts: _Counts) -> None:
        self.counts = counts

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"posts": self.counts.posts, "bytes": self.counts.bytes}))


def make_app() -> tornado.web.Application:
    counts = _Counts()
    return tornado.web.Application(
        [(r"/v1/traces", TracesHandler, {"counts": counts}), (r"/stats", StatsHandler, {"counts": counts})],
        log_function=lambda handler: None,
    )


async def _serve(host: str, port: int) -> None:
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(make_app(), max_body_size=64 << 20)
    server.add_sockets(sockets)
    print("otlp sink listening on http://%s:%d" % (host, sockets[0].getsockname()[1]), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
