"""Real redis-server processes for tests: one server, or a 3-node Redis Cluster.

Every process is started on ephemeral ports bound to 127.0.0.1, waited for
with a deadline (PING / cluster_state:ok), and stopped by its fixture.

Fixtures (import them into tests/conftest.py):
    redis_server_session   session: one shared server
    redis_server           function: the shared server, FLUSHALL before the test
    redis_server_private   function: a server of its own, free to stop/restart/pause
    redis_cluster_session  session: a shared 3-node cluster (skipped if cluster mode cannot run)
    redis_cluster          function: the shared cluster, every node flushed before the test
    redis_cluster_private  function: a cluster of its own, free to stop/restart nodes (~3 s to start)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

START_DEADLINE_S = 10.0
CLUSTER_DEADLINE_S = 30.0


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    """A port the kernel just gave out; the caller retries if it gets taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], *, deadline_s: float, what: str, poll_s: float = 0.02) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        if condition():
            return
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {deadline_s:.1f}s waiting for {what}")
        time.sleep(poll_s)


class RedisServer:
    """One redis-server process; ``stop`` then ``start`` keeps the same port."""

    def __init__(self, workdir: Path, *, extra_args: tuple[str, ...] = (), cluster: bool = False) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.bus_port = 0
        self._extra_args = extra_args
        self._cluster = cluster
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server is not installed (apt-get install -y redis-server)")
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--daemonize", "no",
        ]
        if self._cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.bus_port),
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "2000",
            ]
        return args + list(self._extra_args)

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    def _pings(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise ServerStartError(f"redis-server on port {self.port} exited: {self._log_tail()}")
        try:
            with contextlib.closing(self.client(timeout_s=0.5)) as conn:
                return bool(conn.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    def _log_tail(self) -> str:
        log = self.workdir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def start(self) -> None:
        """Start on the port used before, or on fresh ephemeral ports the first time."""
        fixed = self.port != 0
        last_error: Exception | None = None
        for _ in range(5):
            if not fixed:
                self.port = free_port()
                self.bus_port = free_port() if self._cluster else 0
            self._proc = subprocess.Popen(
                self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
            )
            try:
                wait_until(self._pings, deadline_s=START_DEADLINE_S, what=f"redis-server PING on port {self.port}")
                return
            except ServerStartError as err:
                # Most likely the port was taken between choosing and binding it.
                last_error = err
                self._reap()
        raise ServerStartError(f"could not start redis-server: {last_error}")

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
        self._paused = False

    def stop(self) -> None:
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang instead of failing."""
        if self._proc is not None and not self._paused:
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            os.kill(self._proc.pid, signal.SIGCONT)
            self._paused = False

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as conn:
            conn.flushall()

    def script_flush(self) -> None:
        with contextlib.closing(self.client()) as conn:
            conn.script_flush()


class RedisClusterServers:
    """Three cluster-enabled redis-server processes joined into one cluster, no replicas."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(size)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise ServerStartError("redis-cli is not installed")
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [redis_cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=CLUSTER_DEADLINE_S, check=False,
        )
        if create.returncode != 0:
            raise ServerStartError(
                "redis-cli --cluster create failed: " + create.stdout.decode(errors="replace")[-1500:]
                + create.stderr.decode(errors="replace")[-500:]
            )
        self.wait_ready()

    def wait_ready(self, deadline_s: float = CLUSTER_DEADLINE_S) -> None:
        wait_until(self._ready, deadline_s=deadline_s, what="cluster_state:ok on every node", poll_s=0.05)

    def node_for(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot."""
        asked = next(node for node in self.nodes if node.running)
        with contextlib.closing(asked.client()) as conn:
            slot = int(conn.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in conn.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(key)

    def _ready(self) -> bool:
        for node in self.nodes:
            try:
                with contextlib.closing(node.client()) as conn:
                    info = conn.execute_command("CLUSTER", "INFO")
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or f"cluster_known_nodes:{len(self.nodes)}" not in text:
                return False
        return True

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def script_flush(self) -> None:
        for node in self.nodes:
            node.script_flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> RedisServer:
    if not redis_server_session.running:
        redis_server_session.start()
    redis_server_session.flushall()
    return redis_server_session


@pytest.fixture
def redis_server_private(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _started_cluster(workdir: Path) -> RedisClusterServers:
    cluster = RedisClusterServers(workdir)
    try:
        cluster.start()
    except (ServerStartError, TimeoutError, subprocess.TimeoutExpired) as err:
        cluster.stop()
        pytest.skip(f"Redis Cluster mode cannot run here: {err}")
    return cluster


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = _started_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterServers) -> RedisClusterServers:
    redis_cluster_session.flushall()
    return redis_cluster_session


@pytest.fixture
def redis_cluster_private(tmp_path: Path) -> Iterator[RedisClusterServers]:
    cluster = _started_cluster(tmp_path / "redis-cluster")
    try:
        yield cluster
    finally:
        cluster.stop()
