"""The least a Tornado + curl_httpclient relay can do: the design card's parts and nothing else.

No auth, limiter, events, metrics, tracing, logging or body checks: one
RequestHandler that posts the request body to the upstream with the shared
CurlAsyncHTTPClient (keep-alive, uvloop, the GC settings of gateway.py) and
relays the upstream's answer chunk by chunk (streams included). bench/floor.py measures it against the
fake provider, to tell how much of the gateway's cost per request is its
features and how much is the framework and the HTTP client it is built on.

    python bench/floor_proxy.py --upstream http://127.0.0.1:PORT   # prints "floor proxy listening on ..."
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal

import pycurl
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

_FORWARDED = ("Content-Type", "anthropic-version", "x-api-key")


class Relay(tornado.web.RequestHandler):
    def initialize(self, upstream: str, client: AsyncHTTPClient) -> None:
        self.upstream = upstream
        self.client = client

    async def post(self) -> None:
        headers = {name: self.request.headers[name] for name in _FORWARDED if name in self.request.headers}
        await self.client.fetch(
            HTTPRequest(
                self.upstream + self.request.path,
                method="POST",
                body=self.request.body,
                headers=headers,
                header_callback=self._header_line,
                streaming_callback=self._chunk,
                request_timeout=3600,
                # As the gateway does: libcurl's 64 KB default upload buffer lives as long as the transfer.
                prepare_curl_callback=_small_upload_buffer,
            ),
            raise_error=False,
        )
        self.finish()

    def _header_line(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.set_status(int(line.split()[1]))
        elif line.lower().startswith("content-type:"):
            self.set_header("Content-Type", line.split(":", 1)[1].strip())

    def _chunk(self, chunk: bytes) -> None:
        self.write(chunk)
        self.flush()


def _small_upload_buffer(curl: pycurl.Curl) -> None:
    curl.setopt(pycurl.UPLOAD_BUFFERSIZE, 16384)


async def serve(host: str, port: int, upstream: str) -> None:
    AsyncHTTPClient.configure("tornado.curl_httpclient.CurlAsyncHTTPClient", max_clients=4000)
    client = AsyncHTTPClient()
    app = tornado.web.Application([(r"/.*", Relay, {"upstream": upstream.rstrip("/"), "client": client})], log_function=lambda _: None)
    server = tornado.httpserver.HTTPServer(app, decompress_request=False)
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server.add_sockets(sockets)
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    print(f"floor proxy listening on http://{host}:{sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
