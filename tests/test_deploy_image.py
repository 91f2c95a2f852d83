"""The container image and the Kubernetes manifests, run for real with podman.

podman builds the repository's Dockerfile FROM a stand-in for the python slim
image (deploy/base-image.sh: Debian bookworm from Debian's packages; built
once per machine), then:

- the image holds the product only, runs as uid 10001 and declares its state volume;
- a container answers the probes and a completion from the fake provider,
  drains an open stream on ``podman stop`` and exits 0, with the usage events
  on the bind-mounted state directory; its RSS idle and with open streams is
  measured against the Kubernetes memory figures;
- ``--processes 2`` (with Redis) keeps prometheus-client's files on the volume;
- ``--demo`` works in the image (the bundled fake provider is in it);
- ``podman kube play`` of deploy/kubernetes (gateway + Redis) serves a request
  with the Redis limits applied (200, 200, 429 for a 2-per-hour actor).

Skipped, saying why, only where podman cannot run at all (not root, no
podman); under CI (``CI`` set) that is a failure instead, since .ci/run
installs podman (deploy/podman-setup.sh).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import (
    ANTHROPIC_KEY,
    DIAGNOSTICS_SECRET,
    TOKEN_A,
    TOKEN_B,
    actor,
    limits,
)
from tests.deploy_support import (
    BASE_IMAGE,
    GATEWAY_UID,
    REPO,
    SESSION,
    b64,
    build_base_image,
    build_gateway_image,
    build_redis_image,
    container_logs,
    container_pid,
    free_port,
    image_config,
    image_size,
    kube_play_documents,
    load_manifests,
    open_streams,
    podman_unavailable,
    remove_containers,
    rss_bytes,
    run,
    wait_http,
    wait_until,
)

ROUTE = "/v1/completions/anthropic-messages"
MODEL = "claude-3-haiku-20240307"
STATE_DIR = "/var/lib/gateway"
# What .dockerignore keeps out of the image (and so must not be in /app).
NOT_PRODUCT = {"tests", "bench", "docs", "deploy", ".git", ".ci", "Dockerfile", ".dockerignore",
               "pytest.ini", "requirements-dev.txt", "README.md", "BENCHMARKS.md"}
# Open streams for the RSS measurement (BENCHMARKS.md measures 2,000 on the host).
STREAMS = 300


def _report(key: str, value: Any) -> None:
    """A measured figure, printed (``pytest -s``) for deploy/README.md."""
    print(f"deploy measurement: {key} = {value}")


@pytest.fixture(scope="module")
def podman() -> None:
    reason = podman_unavailable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the container tests (.ci/run runs deploy/podman-setup.sh): {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def gateway_image(podman: None) -> Iterator[str]:
    """The image's id; built once per module (layers cached across runs)."""
    started = time.monotonic()
    build_base_image()
    _report("base image ready (s)", round(time.monotonic() - started, 1))
    tag = f"localhost/llm-gateway:{SESSION}"
    started = time.monotonic()
    image_id = build_gateway_image(tag)
    _report("gateway image build (s)", round(time.monotonic() - started, 1))
    try:
        yield image_id
    finally:
        run(["podman", "untag", image_id, tag], check=False)


def _completion(port: int, token: str, *, stream: bool = False, prompt: str = "hello",
                timeout: float = 30) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    return httpx.post(
        f"http://127.0.0.1:{port}{ROUTE}",
        json=body,
        headers={"Authorization": f"Bearer {token}", "X-Sourcegraph-Feature": "chat_completions"},
        timeout=timeout,
    )


def _write_actors(path: Path, actors: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(actors))
    path.chmod(0o644)
    return path


@pytest.mark.timeout(1200)
def test_image_holds_the_product_only_and_runs_as_non_root(gateway_image: str) -> None:
    config = image_config(gateway_image)
    assert config["User"] == f"{GATEWAY_UID}:{GATEWAY_UID}"
    assert STATE_DIR in config["Volumes"]
    assert config["WorkingDir"] == "/app"
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert "9992/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["CODY_GATEWAY_HOST"] == "0.0.0.0"

    script = (
        "set -e; cd /app; ls -A; echo ---; ls -A fakes; echo ---; python --version; echo ---;"
        " test ! -e /run/secrets/ca_bundle && echo no-secret; id -u;"
        f" stat -c %u {STATE_DIR}; readlink /app/var"
    )
    out = run(["podman", "run", "--rm", "--network", "host", "--entrypoint", "/bin/sh", gateway_image, "-c", script]).stdout
    top, fakes, version, rest = out.split("---\n")
    top_level = set(top.split())
    assert not top_level & NOT_PRODUCT, top_level & NOT_PRODUCT
    # Every package of the product reached the image (whatever was added or renamed since).
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - NOT_PRODUCT
    assert packages <= top_level, packages - top_level
    assert {"gateway.py", "composition.py", "openapi.yaml"} <= top_level
    # Of the test doubles, only the provider the demo runs.
    assert set(fakes.split()) - {"__pycache__"} == {"__init__.py", "provider.py"}
    major, minor = map(int, re.search(r"Python (\d+)\.(\d+)", version).groups())  # type: ignore[union-attr]
    assert (major, minor) >= (3, 11)
    # /app/var, where the built-in config's relative paths point, is the state volume.
    assert rest.split() == ["no-secret", str(GATEWAY_UID), str(GATEWAY_UID), STATE_DIR]

    size = image_size(gateway_image)
    added = size - image_size(BASE_IMAGE)
    _report("image size (MB)", round(size / 1e6))
    _report("image size above the base (MB)", round(added / 1e6))
    # The venv (~195 MB: grpc, bpe-openai's vocabularies, uvloop, ...) and the code (~2 MB).
    assert added < 260e6, f"the image grew to {added / 1e6:.0f} MB above its base: check .dockerignore"


@pytest.mark.timeout(300)
def test_container_serves_drains_on_stop_and_keeps_events_on_the_volume(
    gateway_image: str, fake_provider: Any, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, GATEWAY_UID, GATEWAY_UID)
    streams_actor = actor("streams", TOKEN_B, chat_completions=limits(100_000, concurrentRequests=5_000))
    actors = _write_actors(tmp_path / "actors.json", [actor("container-actor", TOKEN_A), streams_actor])
    port = free_port()
    name = f"gateway-{SESSION}"
    env = {
        "PORT": str(port),
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": ANTHROPIC_KEY,
        "CODY_GATEWAY_ANTHROPIC_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_STATIC_ACTORS_FILE": "/etc/gateway/actors.json",
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": DIAGNOSTICS_SECRET,
        "CODY_GATEWAY_EVENTS_FLUSH_INTERVAL_MS": "100",
    }
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    try:
        started = time.monotonic()
        run(["podman", "run", "-d", "--name", name, "--network", "host", *env_args,
             "-v", f"{actors}:/etc/gateway/actors.json:ro", "-v", f"{state}:{STATE_DIR}", gateway_image])
        wait_http(f"http://127.0.0.1:{port}/-/readyz", container=name)
        _report("container start to ready (s)", round(time.monotonic() - started, 2))
        assert httpx.get(f"http://127.0.0.1:{port}/-/livez", timeout=5).status_code == 200
        assert f"listening on http://0.0.0.0:{port}" in container_logs(name)

        # A completion through the fake provider, with the upstream key from the environment.
        response = _completion(port, TOKEN_A)
        assert response.status_code == 200, response.text
        assert response.json()["content"][0]["text"]
        upstream = [r for r in httpx.get(fake_provider.base_url + "/_fake/requests", timeout=10).json()
                    if r["path"] == "/v1/messages"][-1]
        assert upstream["headers"]["x-api-key"] == ANTHROPIC_KEY

        # Not root: inside the container and as the host sees the process.
        assert run(["podman", "exec", name, "id", "-u"]).stdout.strip() == str(GATEWAY_UID)
        pid = container_pid(name)
        uid_line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(GATEWAY_UID)] * 4

        # Memory: idle, then with STREAMS open streams (paced, so they stay open).
        time.sleep(0.5)
        idle = rss_bytes(pid)
        with open_streams(port, STREAMS, TOKEN_B, "fake:tokens=60 fake:tokens_per_s=4"):
            time.sleep(0.5)
            loaded = rss_bytes(pid)
        per_stream = (loaded - idle) / STREAMS
        _report("idle RSS (MB)", round(idle / 2**20, 1))
        _report(f"RSS with {STREAMS} open streams (MB)", round(loaded / 2**20, 1))
        _report("RSS per open stream (KB)", round(per_stream / 1024, 1))
        _check_kubernetes_memory(idle, per_stream)
        # (the gauge counts the scrape itself)
        closed = time.monotonic()
        wait_until(lambda: _in_flight(port) <= 1, timeout=20, what="the closed streams to end")
        _report(f"{STREAMS} closed streams all ended after (s)", round(time.monotonic() - closed, 2))

        # SIGTERM with a stream open: it finishes, the events are flushed, exit 0.
        received: list[bytes] = []
        first_bytes = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "max_tokens": 100, "stream": True,
                    "messages": [{"role": "user", "content": "fake:tokens=15 fake:tokens_per_s=5"}]}
            headers = {"Authorization": f"Bearer {TOKEN_A}", "X-Sourcegraph-Feature": "chat_completions"}
            with httpx.stream("POST", f"http://127.0.0.1:{port}{ROUTE}", json=body, headers=headers, timeout=30) as r:
                for chunk in r.iter_bytes():
                    received.append(chunk)
                    first_bytes.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first_bytes.wait(15), "the stream did not start"
        stop_started = time.monotonic()
        run(["podman", "stop", "-t", "40", name], timeout=60)
        _report("podman stop with a 3 s stream open (s)", round(time.monotonic() - stop_started, 2))
        reader.join(10)
        body = b"".join(received)
        assert b"event: message_stop" in body, body[-500:]
        assert run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip() == "0"
        logs = container_logs(name)
        assert "draining 1 in-flight" in logs, [line for line in logs.splitlines() if "drain" in line]

        # The usage events are on the volume (the host's directory), written as uid 10001.
        events_file = state / "events.jsonl"
        assert events_file.stat().st_uid == GATEWAY_UID
        events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
        mine = [e for e in events if e["identifier"] == "container-actor" and e["name"] == "CompletionsFinished"]
        assert len(mine) == 2, [e["name"] for e in events]
        metadata = [json.loads(e["metadata"]) if isinstance(e["metadata"], str) else e["metadata"] for e in mine]
        assert sorted(m["stream"] for m in metadata) == [False, True]
        assert all(m["outcome"] == "complete" for m in metadata), metadata
        assert (state / "spool").is_dir()
    finally:
        remove_containers([name])


def _in_flight(port: int) -> float:
    """The gateway's own count of requests being served (its /metrics gauge)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(r"^cody_gateway_http_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert match, "no in-flight gauge in /metrics"
    return float(match.group(1))


def _check_kubernetes_memory(idle: int, per_stream: float) -> None:
    """The Deployment's memory request holds an idle process; its limit, every curl handle streaming."""
    docs = load_manifests("gateway.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    request = _mebibytes(resources["requests"]["memory"]) * 2**20
    limit = _mebibytes(resources["limits"]["memory"]) * 2**20
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["gateway.toml"]
    max_clients = tomllib.loads(config)["upstream"]["max_clients"]
    # BENCHMARKS.md: 46.7–47.9 KB per open stream at 2,000 streams; a few hundred here read higher.
    at_max = idle + max_clients * min(per_stream, 80 * 1024)
    _report(f"projected RSS at upstream.max_clients={max_clients} streams (MB)", round(at_max / 2**20))
    assert idle < request, (idle, request)
    assert at_max < limit, (at_max, limit)


def _mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)


@pytest.mark.timeout(180)
def test_worker_processes_keep_their_metrics_files_on_the_volume(
    gateway_image: str, fake_provider: Any, redis_server: Any, tmp_path: Path
) -> None:
    """``--processes 2`` (needs Redis): prometheus-client's multi-process files land on the state volume."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, GATEWAY_UID, GATEWAY_UID)
    actors = _write_actors(tmp_path / "actors.json", [actor("workers-actor", TOKEN_A)])
    port = free_port()
    name = f"gateway-workers-{SESSION}"
    env = {
        "PORT": str(port),
        "REDIS_ENDPOINT": redis_server.url,
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": ANTHROPIC_KEY,
        "CODY_GATEWAY_ANTHROPIC_API_URL": fake_provider.base_url,
        "CODY_GATEWAY_STATIC_ACTORS_FILE": "/etc/gateway/actors.json",
    }
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    try:
        run(["podman", "run", "-d", "--name", name, "--network", "host", *env_args,
             "-v", f"{actors}:/etc/gateway/actors.json:ro", "-v", f"{state}:{STATE_DIR}", gateway_image,
             "--processes", "2"])
        wait_http(f"http://127.0.0.1:{port}/-/readyz", container=name)
        for _ in range(4):
            assert _completion(port, TOKEN_A).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "cody_gateway_http_requests_total" in metrics
        files = list((state / "prometheus").glob("*.db"))
        assert files, sorted(p.relative_to(state) for p in state.rglob("*"))
        assert all(f.stat().st_uid == GATEWAY_UID for f in files)
        run(["podman", "stop", "-t", "40", name], timeout=60)
        assert run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name]).stdout.strip() == "0"
    finally:
        remove_containers([name])


@pytest.mark.timeout(180)
def test_demo_runs_in_the_image(gateway_image: str) -> None:
    port = free_port()
    name = f"gateway-demo-{SESSION}"
    try:
        run(["podman", "run", "-d", "--name", name, "--network", "host", "-e", f"PORT={port}", gateway_image, "--demo"])
        wait_http(f"http://127.0.0.1:{port}/-/readyz", container=name)
        deadline = time.monotonic() + 20
        while not (match := re.search(r"Demo token: (\S+)", container_logs(name))):
            assert time.monotonic() < deadline, container_logs(name)[-3000:]
            time.sleep(0.1)
        response = _completion(port, match.group(1))
        assert response.status_code == 200, response.text
        assert "fake provider" in response.json()["content"][0]["text"]
    finally:
        remove_containers([name])


@pytest.mark.timeout(300)
def test_kube_play_gateway_and_redis_applies_the_limits(gateway_image: str, fake_provider: Any, tmp_path: Path) -> None:
    build_redis_image()
    tag = f"localhost/llm-gateway:kube-{SESSION}"
    run(["podman", "tag", gateway_image, tag])
    suffix = f"k{SESSION}"
    gateway_port, redis_port = free_port(), free_port()
    token = "sgd_" + "c" * 64
    actors_dir = tmp_path / "actors"
    actors_dir.mkdir()
    actors_dir.chmod(0o755)
    _write_actors(actors_dir / "actors.json", [actor("kube-limited", token, chat_completions=limits(2, "1h"))])
    # The Secret's keys as podman 4.3's secretKeyRef reads them: a JSON map of base64 values.
    secret_name = f"llm-gateway-secrets-{suffix}"
    secret_file = tmp_path / "secret.json"
    secret_file.write_text(json.dumps({"anthropic-access-token": b64(ANTHROPIC_KEY),
                                       "diagnostics-secret": b64(DIAGNOSTICS_SECRET)}))
    docs = kube_play_documents(
        load_manifests("redis.yaml", "gateway.yaml"),
        suffix=suffix,
        gateway_image=tag,
        gateway_port=gateway_port,
        redis_port=redis_port,
        actors_dir=actors_dir,
        extra_env={"CODY_GATEWAY_ANTHROPIC_API_URL": fake_provider.base_url},
    )
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    pods = [f"{d['metadata']['name']}-pod-0" for d in docs if d["kind"] == "Deployment"]
    volumes = [f"{d['metadata']['name']}" for d in docs if d["kind"] == "ConfigMap"]
    gateway_container = f"llm-gateway-{suffix}-pod-0-gateway"
    redis_container = f"redis-{suffix}-pod-0-redis"
    try:
        run(["podman", "secret", "create", secret_name, str(secret_file)])
        run(["podman", "kube", "play", "--network", "host", str(play)], timeout=120)
        wait_http(f"http://127.0.0.1:{gateway_port}/-/readyz", timeout=60, container=gateway_container)
        assert httpx.get(f"http://127.0.0.1:{gateway_port}/-/livez", timeout=5).status_code == 200

        codes = [_completion(gateway_port, token).status_code for _ in range(3)]
        assert codes == [200, 200, 429], codes
        # The limit lives in the Redis pod, not in the gateway process.
        keys = run(["podman", "exec", redis_container, "redis-cli", "-p", str(redis_port), "--scan"]).stdout.split()
        assert any("kube-limited" in key for key in keys), keys
        # The diagnostics secret came from the Secret; Redis is up as the gateway sees it.
        health = httpx.get(f"http://127.0.0.1:{gateway_port}/-/healthz",
                           headers={"Authorization": f"Bearer {DIAGNOSTICS_SECRET}"}, timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["redis"]["up"] is True
        # The securityContext holds: uid 10001, a read-only root file system.
        assert run(["podman", "exec", gateway_container, "id", "-u"]).stdout.strip() == str(GATEWAY_UID)
        assert run(["podman", "exec", gateway_container, "touch", "/app/x"], check=False).returncode != 0
        assert run(["podman", "exec", gateway_container, "touch", f"{STATE_DIR}/x"], check=False).returncode == 0
    finally:
        run(["podman", "kube", "down", str(play)], check=False, timeout=120)
        for pod in pods:
            run(["podman", "pod", "rm", "-f", "-t", "0", pod], check=False, timeout=60)
        for volume in volumes:
            run(["podman", "volume", "rm", "-f", volume], check=False)
        run(["podman", "secret", "rm", secret_name], check=False)
        run(["podman", "untag", gateway_image, tag], check=False)
