"""A start that cannot go on says why in one line and exits 2; relative config paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from fakes.processes import REPO, GatewayProcess
from tests.conftest import TOKEN_A, actor


def start(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CODY_GATEWAY_")}
    full = {**base, "CODY_GATEWAY_EVENTS_FILE": str(tmp_path / "events.jsonl"),
            "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(tmp_path / "spool"), **env}  # fmt: skip
    return subprocess.run(
        [sys.executable, str(REPO / "gateway.py"), "--port", env.get("PORT", "0"), *args],
        cwd=str(tmp_path), env=full, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    out = proc.stderr
    assert "Traceback" not in out and "was destroyed but it is pending" not in out, out
    line = [entry for entry in out.splitlines() if entry.startswith("gateway: ")]
    assert len(line) == 1, out
    for needle in needles:
        assert needle in line[0], out


def actors_file(tmp_path: Path, content: str) -> str:
    path = tmp_path / "actors.json"
    path.write_text(content)
    return str(path)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = start(tmp_path, {"PORT": port, "CODY_GATEWAY_STATIC_ACTORS_FILE": actors_file(tmp_path, "[]")})
    assert_one_line_failure(proc, "cannot listen on 127.0.0.1:" + port)


def test_invalid_actors_file(tmp_path: Path) -> None:
    proc = start(tmp_path, {"CODY_GATEWAY_STATIC_ACTORS_FILE": actors_file(tmp_path, "{not json")})
    assert_one_line_failure(proc, "static actors file", "is invalid", "not JSON")


def test_unreadable_actors_file(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.json"
    directory.mkdir()
    proc = start(tmp_path, {"CODY_GATEWAY_STATIC_ACTORS_FILE": str(directory)})
    assert_one_line_failure(proc, "static actors file", "cannot be read")


def test_missing_actors_file_is_an_error_unless_optional(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    proc = start(tmp_path, {"CODY_GATEWAY_STATIC_ACTORS_FILE": missing})
    assert_one_line_failure(proc, missing, "does not exist", "static_file_optional")
    gw = GatewayProcess(tmp_path, {"CODY_GATEWAY_STATIC_ACTORS_FILE": missing, "CODY_GATEWAY_ACTORS_STATIC_FILE_OPTIONAL": "true",
                                   "CODY_GATEWAY_EVENTS_FILE": str(tmp_path / "e.jsonl")})  # fmt: skip
    try:
        assert httpx.get(gw.base_url + "/-/readyz", timeout=10).status_code == 200
    finally:
        gw.stop()


def test_unreachable_redis_under_fail_closed(tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proc = start(tmp_path, {
        "CODY_GATEWAY_STATIC_ACTORS_FILE": actors_file(tmp_path, "[]"),
        "REDIS_ENDPOINT": f"redis://127.0.0.1:{port}/0",
        "CODY_GATEWAY_REDIS_FAILURE_POLICY": "fail_closed",
    })  # fmt: skip
    assert_one_line_failure(proc, "Redis", "unreachable", "fail_closed")


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "my-actors.json").write_text(json.dumps([actor("rel", TOKEN_A)]))
    (conf / "gateway.toml").write_text('[actors]\nstatic_file = "my-actors.json"\n[events]\nfile = "state/events.jsonl"\nspool_dir = "state/spool"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODY_GATEWAY_")}
    gw = GatewayProcess(elsewhere, env, args=["--config", str(conf / "gateway.toml")])
    try:
        limits = httpx.get(gw.base_url + "/v1/limits", headers={"Authorization": f"Bearer {TOKEN_A}"}, timeout=10)
        assert limits.status_code == 200, limits.text
    finally:
        gw.stop()
    assert (conf / "state" / "spool").is_dir()


def test_missing_token_says_so(start_gateway: object) -> None:
    gw = start_gateway()  # type: ignore[operator]
    response = httpx.post(gw.base_url + "/v1/completions/anthropic-messages", json={}, headers={"X-Sourcegraph-Feature": "chat_completions"}, timeout=10)
    assert response.status_code == 403
    assert "no token was sent" in response.json()["error"]
