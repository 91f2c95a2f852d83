"""Memory of the upstream side alone: RSS per open streaming transfer in a curl client.

    python bench/curlmem.py --streams 1000                       # our Transport, as the gateway runs it
    python bench/curlmem.py --streams 1000 --via tornado         # Tornado's curl client, no prepare hook
    python bench/curlmem.py --streams 1000 --max-clients 1000 --maxconnects 0 --trace

Starts bench/fake_provider.py, builds one CurlAsyncHTTPClient in this process
(preallocating ``--max-clients`` handles, as the gateway does), then opens
``--streams`` slow Anthropic streams and waits until every one has received
its first chunk. Prints RSS: before the client, after it (the cost of the
preallocated handles, paid at start-up), and with every stream open (the cost
per open transfer). With ``--trace``, tracemalloc reports how much of the
per-transfer growth is Python objects (slower; RSS then includes the tracer's
own overhead, so take RSS figures from a run without it). The knobs
(``--upload-buffer``, ``--buffersize``, ``--maxconnects``, ``--http``,
``--keepalive``, ``--trim``) try libcurl settings without editing code.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pycurl
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from bench.stack import Proc, start_fake_provider

_PAGE = os.sysconf("SC_PAGE_SIZE")
_HTTP = {"1.1": pycurl.CURL_HTTP_VERSION_1_1, "1.0": pycurl.CURL_HTTP_VERSION_1_0}


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def body(tokens: int, per_s: float) -> bytes:
    return (
        b'{"model":"claude-3-haiku-20240307","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"'
        + f"fake:tokens={tokens} fake:tokens_per_s={per_s:g}".encode()
        + b'"}]}'
    )


def extra_options(args: argparse.Namespace) -> Any:
    def prepare(curl: pycurl.Curl) -> None:
        if args.upload_buffer:
            curl.setopt(pycurl.UPLOAD_BUFFERSIZE, args.upload_buffer)
        if args.buffersize:
            curl.setopt(pycurl.BUFFERSIZE, args.buffersize)
        if args.http:
            curl.setopt(pycurl.HTTP_VERSION, _HTTP[args.http])
        if args.keepalive:
            curl.setopt(pycurl.TCP_KEEPALIVE, 1)
        if args.postfields:
            curl.setopt(pycurl.POSTFIELDS, args.payload)

    return prepare


async def run(args: argparse.Namespace, fake_url: str) -> dict[str, float]:
    gc.collect()
    malloc_trim()
    r0 = rss()
    AsyncHTTPClient.configure(
        "tornado.curl_httpclient.CurlAsyncHTTPClient", max_clients=args.max_clients, max_body_size=1 << 40
    )
    client = AsyncHTTPClient()
    multi = client._multi  # type: ignore[attr-defined]
    if args.maxconnects is not None:
        multi.setopt(pycurl.M_MAXCONNECTS, args.maxconnects)
    gc.collect()
    r1 = rss()
    url = fake_url.rstrip("/") + "/v1/messages"
    headers = {"Content-Type": "application/json", "X-API-Key": "bench", "anthropic-version": "2023-06-01"}
    first = asyncio.get_running_loop().create_future()
    seen = 0
    prepare = extra_options(args)

    def on_chunk(_: bytes, state: list[bool]) -> None:
        nonlocal seen
        if not state[0]:
            state[0] = True
            seen += 1
            if seen == args.streams and not first.done():
                first.set_result(None)

    tasks: list[asyncio.Future[Any]] = []
    base: tracemalloc.Snapshot | None = None
    if tracemalloc.is_tracing():
        if args.via == "transport":
            # The imports below are start-up cost, not per transfer.
            import conf.loader  # noqa: F401
            import upstreams.transport  # noqa: F401
        gc.collect()
        base = tracemalloc.take_snapshot()
        traced0 = tracemalloc.get_traced_memory()[0]
    if args.via == "transport":
        from conf.loader import load_config
        from upstreams.base import UpstreamRequest
        from upstreams.transport import AbortFlag, Transport

        transport = Transport(client, load_config(environ={}).upstream)
        request = UpstreamRequest(url=url, headers=headers, body=args.payload)
        for _ in range(args.streams):
            state = [False]
            tasks.append(asyncio.ensure_future(transport.send(
                request, timeout_s=600, abort=AbortFlag(), on_headers=lambda s, h: None,
                on_chunk=lambda c, st=state: on_chunk(c, st),
            )))
    else:
        for _ in range(args.streams):
            state = [False]
            tasks.append(asyncio.ensure_future(client.fetch(HTTPRequest(
                url, method="POST", headers=dict(headers), body=args.payload, request_timeout=600,
                streaming_callback=lambda c, st=state: on_chunk(c, st), prepare_curl_callback=prepare,
                decompress_response=False,
            ), raise_error=False)))
    await asyncio.wait_for(first, 120)
    # Let the first few events settle into every transfer's buffers.
    await asyncio.sleep(1.5)
    gc.collect()
    if args.trim:
        malloc_trim()
    r2 = rss()
    out = {
        "rss_start_mb": r0 / 1e6,
        "client_kb_per_handle": (r1 - r0) / 1024 / args.max_clients,
        "kb_per_transfer": (r2 - r1) / 1024 / args.streams,
    }
    if base is not None:
        out["python_kb_per_transfer"] = (tracemalloc.get_traced_memory()[0] - traced0) / 1024 / args.streams
        for stat in tracemalloc.take_snapshot().compare_to(base, "lineno")[:14]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / 1024 / args.streams:7.2f} KB/transfer  {frame.filename}:{frame.lineno}")
    for task in tasks:
        task.cancel()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--max-clients", type=int, default=4000, help="handles Tornado preallocates (the gateway: 4000)")
    p.add_argument("--via", choices=("transport", "tornado"), default="transport")
    p.add_argument("--upload-buffer", type=int, default=0, help="CURLOPT_UPLOAD_BUFFERSIZE (tornado only; 0: curl's default)")
    p.add_argument("--buffersize", type=int, default=0, help="CURLOPT_BUFFERSIZE (tornado only)")
    p.add_argument("--maxconnects", type=int, default=None, help="CURLMOPT_MAXCONNECTS")
    p.add_argument("--http", choices=sorted(_HTTP), default=None)
    p.add_argument("--keepalive", action="store_true", help="CURLOPT_TCP_KEEPALIVE")
    p.add_argument("--postfields", action="store_true", help="body through CURLOPT_POSTFIELDS (tornado only)")
    p.add_argument("--trim", action="store_true", help="malloc_trim before the last reading")
    p.add_argument("--trace", action="store_true", help="tracemalloc: the Python share")
    args = p.parse_args()
    args.payload = body(60, 0.5)
    if args.trace:
        tracemalloc.start(1)
    import tempfile

    with tempfile.TemporaryDirectory() as wd:
        fake, url = start_fake_provider(Path(wd))
        try:
            import uvloop

            started = time.monotonic()
            out = uvloop.run(run(args, url))
            out["seconds"] = time.monotonic() - started
        finally:
            Proc.stop(fake)
    settings = {k: v for k, v in vars(args).items() if k not in ("payload",)}
    print(" ".join(f"{k}={v}" for k, v in settings.items()))
    print(" ".join(f"{k}={v:.2f}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
