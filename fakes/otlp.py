"""A local OTLP/HTTP trace collector: keeps every post, decodes JSON and protobuf alike.

Tests use it in-process (``OtlpReceiver()``); benchmarks run it as a process
that only counts what it gets, so that "tracing on" includes the exporter's
encoding and posts as in production:

    python -m fakes.otlp --port 0     # prints "otlp sink listening on http://..."
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def _hex_ids_to_base64(node: Any) -> Any:
    # OTLP/JSON writes ids as hex; the generic protobuf JSON mapping wants base64.
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                out[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    return node


def decode(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """An OTLP/HTTP traces body (JSON or protobuf) as the protobuf message; strict about unknown JSON fields."""
    request = ExportTraceServiceRequest()
    if content_type.startswith("application/json"):
        json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request)
    else:
        request.ParseFromString(body)
    return request


class OtlpReceiver:
    """Answers each POST with ``statuses`` in turn (then 200); records bodies and headers (names lower-cased)."""

    def __init__(self, statuses: list[int] | None = None, *, keep: bool = True, port: int = 0) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.count = 0
        self.bytes = 0
        self.statuses = list(statuses or [])
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.count += 1
                    receiver.bytes += len(body)
                    if status == 200 and keep:
                        receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("Content-Type", self.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def bodies(self) -> list[bytes]:
        """Every body received, decompressed."""
        with self.lock:
            posts = list(self.posts)
        return [gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body for headers, body in posts]

    def requests(self) -> list[ExportTraceServiceRequest]:
        with self.lock:
            content_types = [headers.get("content-type", "") for headers, _ in self.posts]
        return [decode(body, content_type) for body, content_type in zip(self.bodies, content_types)]

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.requests()
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def main() -> None:
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="OTLP/HTTP sink that counts posts (for benchmarks)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    receiver = OtlpReceiver(keep=False, port=args.port)
    print(f"otlp sink listening on {receiver.url}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    receiver.stop()


if __name__ == "__main__":
    main()
