"""Starts the benchmark stack on 127.0.0.1: fake provider, Redis, OTLP sink, gateway.

"All production features on" means: the Redis limiter (a real redis-server),
usage events (JSONL sink with journal and spool), tracing with every request
sampled and exported over OTLP/HTTP (to fakes/otlp.py run as a sink), Prometheus
metrics and the JSON logs, at info level, to a file. Each process writes its
output to a log file in the work directory (a pipe that nobody reads fast
enough would throttle the gateway), and readiness is a line in that file
waited for with a deadline.

Used by compare.py, soak.py and profile.py; runnable alone to get a stack to
aim loadtest.py at:

    python bench/stack.py            # prints URLs and the token, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fakes.processes import (
    REPO,
    FakeProviderProcess,
    ManagedProcess,
    free_port,
    start_server,
)

# Kept importable from here: the scripts in bench/ use these names.
__all__ = ["REPO", "ManagedProcess", "Stack", "StackError", "exit_on_sigterm", "free_port", "start_stack"]

TOKEN = "sgd_" + "b" * 64
ACTOR_ID = "bench-actor"
UPSTREAM_KEY = "bench-upstream-key"


class StackError(RuntimeError):
    pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that a script's ``finally`` stops the stack it started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _answers(url: str) -> bool:
    # No proxy, whatever the environment says: everything here is on 127.0.0.1.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def start_redis(workdir: Path) -> tuple[ManagedProcess, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise StackError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc, _ = start_server(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(data)],
        name="redis-server",
        ready=r"Ready to accept connections",
        timeout=15,
        log_path=workdir / "redis.log",
    )
    return proc, f"redis://127.0.0.1:{port}/0"


def start_fake_provider(workdir: Path) -> tuple[ManagedProcess, str]:
    # A short request log: the fake keeps one dict per request for tests' introspection.
    fake = FakeProviderProcess(["--request-log-size", "16"], log_path=workdir / "fake_provider.log")
    return fake.process, fake.base_url


def start_otlp_sink(workdir: Path) -> tuple[ManagedProcess, str]:
    proc, match = start_server(
        [sys.executable, "-m", "fakes.otlp", "--port", "0"],
        name="otlp sink",
        ready=r"otlp sink listening on (http://[\w.:-]+:\d+)",
        log_path=workdir / "otlp.log",
    )
    return proc, match.group(1)


def bench_actor() -> dict[str, object]:
    # Limits far above anything a run can reach: the limiter's cost is measured, never its refusals.
    unlimited = {"limit": 1_000_000_000, "interval": "24h", "allowedModels": ["*"], "concurrentRequests": 1_000_000}
    return {
        "id": ACTOR_ID,
        "name": "Benchmark actor",
        "accessEnabled": True,
        "token": TOKEN,
        "rateLimits": {
            "chat_completions": unlimited,
            "code_completions": unlimited,
            "embeddings": {**unlimited, "limit": 1_000_000_000_000},
        },
    }


def gateway_env(workdir: Path, fake_url: str, *, redis_url: str, otlp_url: str, processes: int) -> dict[str, str]:
    actors = workdir / "actors.json"
    actors.write_text(json.dumps([bench_actor()]))
    env = {
        "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN": UPSTREAM_KEY,
        "CODY_GATEWAY_ANTHROPIC_API_URL": fake_url,
        "CODY_GATEWAY_OPENAI_ACCESS_TOKEN": UPSTREAM_KEY,
        "CODY_GATEWAY_OPENAI_API_URL": fake_url,
        "CODY_GATEWAY_FIREWORKS_ACCESS_TOKEN": UPSTREAM_KEY,
        "CODY_GATEWAY_FIREWORKS_API_URL": fake_url,
        "CODY_GATEWAY_GOOGLE_ACCESS_TOKEN": UPSTREAM_KEY,
        "CODY_GATEWAY_GOOGLE_API_URL": fake_url,
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_TOKEN": UPSTREAM_KEY,
        "CODY_GATEWAY_SOURCEGRAPH_EMBEDDINGS_API_URL": fake_url + "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer",
        "CODY_GATEWAY_STATIC_ACTORS_FILE": str(actors),
        "CODY_GATEWAY_ACTORS_SOURCES": '["static"]',
        "CODY_GATEWAY_EVENTS_SINK": "jsonl",
        "CODY_GATEWAY_EVENTS_FILE": str(workdir / "events.jsonl"),
        "CODY_GATEWAY_EVENTS_SPOOL_DIR": str(workdir / "spool"),
        "CODY_GATEWAY_TELEMETRY_TRACE_POLICY": "all",
        "CODY_GATEWAY_TELEMETRY_LOG_LEVEL": "info",
        "CODY_GATEWAY_TELEMETRY_ACCESS_LOG": "true",
        "CODY_GATEWAY_DIAGNOSTICS_SECRET": "bench-diagnostics",
        "CODY_GATEWAY_PROCESSES": str(processes),
    }
    if processes > 1:
        # Multiprocess mode needs a directory shared by the workers; one process
        # keeps prometheus-client's in-memory values, as in production.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "prometheus")
        (workdir / "prometheus").mkdir(exist_ok=True)
    if redis_url:
        env["CODY_GATEWAY_REDIS_ENDPOINT"] = redis_url
    if otlp_url:
        env["CODY_GATEWAY_TELEMETRY_OTLP_ENDPOINT"] = otlp_url
    return env


@dataclass
class Stack:
    workdir: Path
    fake_url: str
    gateway_url: str = ""
    redis_url: str = ""
    otlp_url: str = ""
    token: str = TOKEN
    procs: dict[str, ManagedProcess] = field(default_factory=dict)
    _own_workdir: bool = False

    @property
    def gateway(self) -> ManagedProcess:
        return self.procs["gateway"]

    @property
    def fake(self) -> ManagedProcess:
        return self.procs["fake"]

    def stop(self) -> None:
        # The gateway first, so that its draining does not see its upstreams vanish.
        for name in ("gateway", "fake", "otlp", "redis"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop(20)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_stack(
    *,
    workdir: Path | None = None,
    processes: int = 1,
    redis: bool = True,
    otlp: bool = True,
    gateway: bool = True,
    extra_env: Mapping[str, str] | None = None,
    gateway_prefix: list[str] | None = None,
    gateway_dir: Path | None = None,
) -> Stack:
    """Everything up and ready, or everything stopped and an exception.

    ``gateway_prefix`` replaces the interpreter in the gateway command (e.g.
    ``[python, "-m", "pyinstrument", ...]``).
    ``gateway_dir`` runs the gateway from another checkout (e.g. a snapshot of
    HEAD, so that files being edited in the work tree do not break a run).
    """
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="gw-bench-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    stack = Stack(workdir=wd, fake_url="", _own_workdir=own)
    try:
        fake, stack.fake_url = start_fake_provider(wd)
        stack.procs["fake"] = fake
        if redis:
            stack.procs["redis"], stack.redis_url = start_redis(wd)
        if otlp:
            stack.procs["otlp"], stack.otlp_url = start_otlp_sink(wd)
        if gateway:
            env = gateway_env(wd, stack.fake_url, redis_url=stack.redis_url, otlp_url=stack.otlp_url, processes=processes)
            env.update(extra_env or {})
            source = gateway_dir or Path(os.environ.get("BENCH_GATEWAY_DIR") or REPO)
            port = free_port()
            cmd = [*(gateway_prefix or [sys.executable]), str(source / "gateway.py"), "--port", str(port)]
            proc = ManagedProcess(cmd, name="gateway", log_path=wd / "gateway.log", env=env, cwd=wd)
            stack.procs["gateway"] = proc
            stack.gateway_url = f"http://127.0.0.1:{port}"
            # Readiness is an answer on the port, not a log line: the log level may hide it.
            proc.wait_until(lambda: _answers(stack.gateway_url + "/-/__version"), 60, "an answer on /-/__version")
    except BaseException:
        stack.stop()
        raise
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the benchmark stack until Ctrl-C.")
    parser.add_argument("--processes", type=int, default=1, help="gateway worker processes on one port")
    parser.add_argument("--no-redis", action="store_true", help="in-process limiter instead of Redis")
    parser.add_argument("--no-otlp", action="store_true", help="record spans but export none")
    args = parser.parse_args()
    exit_on_sigterm()
    stack = start_stack(processes=args.processes, redis=not args.no_redis, otlp=not args.no_otlp)
    try:
        print(f"fake provider  {stack.fake_url}")
        print(f"gateway        {stack.gateway_url}  (pid {stack.gateway.pid})")
        print(f"token          {stack.token}")
        print(f"work dir       {stack.workdir}")
        print(f"try: python bench/loadtest.py --url {stack.gateway_url} --token {stack.token} --pid {stack.gateway.pid}")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
