"""A local HTTP server standing in for Sentry: receives and decodes envelopes.

Point a DSN at it (``fake.dsn``); every envelope the SDK posts is kept raw
(decompressed) and parsed into items, so tests can look for tags and make
sure no prompt or secret went out.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def decode_body(raw: bytes, encoding: str) -> bytes:
    encoding = encoding.lower().strip()
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    if encoding == "br":
        import brotli  # only if the SDK chose it, which it does only when brotli is installed

        return bytes(brotli.decompress(raw))
    return raw


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[tuple[dict[str, Any], Any]]]:
    """(envelope header, [(item header, payload)]) per the envelope format."""
    header_line, _, rest = body.partition(b"\n")
    items: list[tuple[dict[str, Any], Any]] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item_header = json.loads(item_line)
        length = item_header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length + 1 :]
        try:
            parsed: Any = json.loads(payload)
        except ValueError:
            parsed = payload
        items.append((item_header, parsed))
    return json.loads(header_line), items


class FakeSentry:
    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        self._cond = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                body = decode_body(raw, self.headers.get("Content-Encoding", ""))
                with fake._cond:
                    fake.envelopes.append(body)
                    fake._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.dsn = f"http://0123456789abcdef0123456789abcdef@127.0.0.1:{self.port}/42"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def events(self) -> list[dict[str, Any]]:
        """Every error event received so far."""
        with self._cond:
            bodies = list(self.envelopes)
        out = []
        for body in bodies:
            _, items = parse_envelope(body)
            out += [payload for header, payload in items if header.get("type") == "event"]
        return out

    def wait_for_events(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if len(events) >= count:
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake Sentry got {len(events)} events, wanted {count}")
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
