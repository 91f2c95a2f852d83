"""Descriptor exhaustion by idle connections (issue 17 item 9), against a gateway with 256 descriptors."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.processes import LISTENING, REPO, start_server, write_actors
from tests.conftest import DEFAULT_ACTORS, TOKEN_A


@pytest.mark.timeout(90)
def test_idle_connections_beyond_the_descriptors_neither_spin_nor_starve_real_requests(
    tmp_path: Path, gateway_env: dict[str, str]
) -> None:
    write_actors(Path(gateway_env["CODY_GATEWAY_STATIC_ACTORS_FILE"]), DEFAULT_ACTORS)
    # A hard limit of 256 that the gateway cannot raise: at most (256 - 128) / 2 = 64 client connections.
    command = f"ulimit -Sn 256 && ulimit -Hn 256 && exec {sys.executable} {REPO / 'gateway.py'} --port 0"
    gw, match = start_server(["bash", "-c", command], name="gateway", ready=LISTENING, timeout=30, env=gateway_env, cwd=tmp_path)
    base_url, port = match.group(1), int(match.group(2))
    idle: list[socket.socket] = []
    try:
        for _ in range(300):  # far more idle, unauthenticated connections than the gateway can hold
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(conn)
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
        body: dict[str, Any] = {"model": "claude-3-haiku-20240307", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(10):
            with httpx.Client(timeout=10) as client:  # a new connection each time, as a new client would
                assert client.post(base_url + "/v1/completions/anthropic-messages", json=body, headers=headers).status_code == 200
        assert time.monotonic() - started < 10
        # Idle connections were shed to make room, and the condition was logged once per interval, not per accept.
        closed = 0
        for conn in idle:
            conn.settimeout(0.01)
            try:
                closed += conn.recv(1) == b""
            except (TimeoutError, OSError):
                pass
        assert closed >= 10, closed
        lines = gw.output().splitlines()
        assert len(lines) < 200, len(lines)
        assert not any("Traceback" in line or ("Too many open files" in line and "error" in line.lower() and "accept failed" not in line) for line in lines)
    finally:
        for conn in idle:
            conn.close()
        gw.stop()
