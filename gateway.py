"""Entry point: parse flags, load config, build the services, serve, shut down cleanly.

    python gateway.py [--config PATH] [--port N] [--demo]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from conf.loader import ConfigError, load_config
from conf.model import Config

log = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LLM gateway (Cody Gateway compatible)")
    parser.add_argument("--config", help="TOML config file (default: conf/gateway.toml)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides PORT and the config)")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--processes", type=int, help="worker processes sharing the port (needs Redis)")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="also run the bundled fake provider, point every provider at it, and print a working token",
    )
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    from telemetry.logs import configure_logging

    configure_logging(level)


async def serve(
    config: Config, *, demo_token: str | None = None, sockets: list[socket.socket] | None = None, worker: int | None = None
) -> None:
    """Build everything once, serve until SIGTERM/SIGINT, then drain and stop."""
    from tornado.ioloop import PeriodicCallback

    from composition import StartupError, build_gateway
    from handlers.http_server import BoundedHTTPServer

    try:
        sockets = sockets or _bind(config)
    except OSError as exc:
        raise StartupError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    gateway = await build_gateway(config, version=_version())
    services = gateway.services
    server = BoundedHTTPServer(
        gateway.app,
        max_connections=config.server.max_connections,
        # Well above the cap, so that BodyHandler (a JSON 413), not Tornado (a bare
        # 400), sees an upload that goes over it.
        max_body_size=2 * config.server.max_body_bytes + 65536,
        max_buffer_size=2 * config.server.max_body_bytes + 65536,
        idle_connection_timeout=config.server.idle_connection_timeout_s,
        body_timeout=config.server.body_timeout_s,
        max_header_size=config.server.max_header_bytes,
        decompress_request=False,
        xheaders=False,
    )
    # Everything built at start-up (curl handles, modules, the tokenizer) lives
    # as long as the process: take it out of the collector's passes, and make
    # full passes rarer, so that collections do not stall thousands of streams.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
    # A background thread doing Python work (the BigQuery flush, Sentry's
    # transport, tokenizing a large prompt) holds the GIL until the loop has
    # asked for it for a whole switch interval: 5 ms by default, a stall of
    # every request in flight. 1 ms bounds that; the threads only get slower.
    sys.setswitchinterval(0.001)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    if worker is None:
        log.info("listening on http://%s:%d", config.host, port)
    else:
        log.info("worker %d serving http://%s:%d", worker, config.host, port)
    services.ready = True
    if demo_token is not None:
        _print_demo_help(config.host, port, demo_token)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    static_source = gateway.static_source
    if static_source is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(static_source.reload(force=True)))
        watcher = PeriodicCallback(lambda: asyncio.ensure_future(static_source.reload(force=False)), 1000)
        watcher.start()
    await stop.wait()

    log.info("shutting down: draining %d in-flight requests", services.in_flight)
    services.draining = True
    server.stop()
    deadline = loop.time() + config.server.drain_timeout_s
    while services.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if services.in_flight:
        log.warning("drain timeout: %d requests still in flight are cut off", services.in_flight)
    await server.close_all_connections()
    await gateway.close(events_timeout_s=max(1.0, deadline - loop.time() + 5))
    log.info("stopped")


def _bind(config: Config) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    return bind_sockets(config.port, config.host)


def _bind_per_worker(config: Config) -> list[list[socket.socket]]:
    """One listening socket (per address family) for each worker, all on one port with SO_REUSEPORT.

    With one shared socket, whichever worker wakes first accepts a whole burst
    of connections and keep-alive clients stay where they landed (measured: two
    workers served no more than one). Separate sockets let the kernel spread
    connections over the workers by hashing them.
    """
    from tornado.netutil import bind_sockets

    first = bind_sockets(config.port, config.host, reuse_port=True)
    port = first[0].getsockname()[1]
    return [first] + [bind_sockets(port, config.host, reuse_port=True) for _ in range(config.processes - 1)]


def run_workers(config: Config) -> int:
    """Pre-fork ``config.processes`` workers, each accepting on its own SO_REUSEPORT socket.

    The parent only supervises: it forwards SIGTERM/SIGINT/SIGHUP to the
    workers, restarts a worker that dies unexpectedly, and exits when all
    have stopped. Metrics aggregate through prometheus-client's multiprocess
    directory, which is created fresh here before any worker imports it.
    """
    import shutil
    import time

    try:
        groups = _bind_per_worker(config)
    except OSError as exc:
        print(f"gateway: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    port = groups[0][0].getsockname()[1]
    from conf.loader import resolve_path

    # Beside the event spool: the gateway's state stays under one directory (the image's volume).
    default_dir = resolve_path(config, config.events.spool_dir).parent / "prometheus"
    metrics_dir = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(default_dir)))
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)

    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            from telemetry.logs import tag_worker

            tag_worker(index)
            # The parent keeps every socket open (a restarted worker takes its
            # predecessor's over, queued connections included); a worker keeps its own.
            for other, group in enumerate(groups):
                if other != index:
                    for sock in group:
                        sock.close()
            from composition import StartupError
            from telemetry.logs import flush_logs

            try:
                _use_uvloop()
                asyncio.run(serve(config, sockets=groups[index], worker=index))
            except StartupError as exc:
                flush_logs()
                print(f"gateway: {exc}", file=sys.stderr, flush=True)
                os._exit(2)
            except BaseException:
                log.exception("worker %d crashed", index)
                flush_logs()
                os._exit(1)
            flush_logs()
            os._exit(0)
        children[pid] = index

    def forward(sig: int, _frame: Any) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for first in range(config.processes):
        spawn(first)
    log.info("listening on http://%s:%d (%d worker processes)", config.host, port, config.processes)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        from telemetry.metrics import mark_worker_dead

        mark_worker_dead(pid)
        exit_code = os.waitstatus_to_exitcode(code)
        if exit_code == 2 and not stopping:
            # A worker that cannot start (Redis, actors file) would fail the same way again.
            stopping = True
            status = 2
            forward(signal.SIGTERM, None)
            continue
        if not stopping and exit_code != 0:
            log.error("worker %d exited with status %d; restarting it", index, exit_code)
            time.sleep(0.5)
            spawn(index)
        elif exit_code != 0 and -exit_code not in (signal.SIGTERM, signal.SIGINT):
            # A worker stopped by the signal itself (before its loop's handler was
            # installed) stopped as asked; anything else is a failure.
            status = 1
    return status


def _version() -> str:
    from handlers.services import VERSION

    return os.environ.get("CODY_GATEWAY_VERSION", VERSION)


async def start_demo(config_path: str | None, overrides: dict[str, Any]) -> tuple[Config, str]:
    """Run the fake provider in this process and point every provider at it."""
    from fakes.provider import start_fake_provider

    fake = await start_fake_provider(host="127.0.0.1", port=0)
    token = "sgd_" + secrets.token_hex(32)
    var = Path("var")
    var.mkdir(exist_ok=True)
    actors_file = var / "demo-actors.json"
    unlimited = {"limit": 1000, "interval": "1h", "allowedModels": ["*"], "concurrentRequests": 100}
    actors_file.write_text(
        json.dumps(
            [
                {
                    "id": "demo",
                    "name": "Demo actor",
                    "accessEnabled": True,
                    "token": token,
                    "rateLimits": {
                        "chat_completions": unlimited,
                        "code_completions": unlimited,
                        "embeddings": {**unlimited, "limit": 1_000_000},
                    },
                }
            ],
            indent=2,
        )
    )
    demo_overrides = {
        "actors.static_file": str(actors_file.resolve()),
        "diagnostics_secret": os.environ.get("CODY_GATEWAY_DIAGNOSTICS_SECRET") or secrets.token_hex(16),
    }
    for provider in ("anthropic", "openai", "fireworks", "google"):
        demo_overrides[f"providers.{provider}.access_token"] = "demo-key"
        demo_overrides[f"providers.{provider}.api_url"] = fake.base_url
    demo_overrides["providers.sourcegraph_embeddings.access_token"] = "demo-key"
    demo_overrides["providers.sourcegraph_embeddings.api_url"] = (
        fake.base_url + "/v2/models/st-multi-qa-mpnet-base-dot-v1/infer"
    )
    config = load_config(config_path, overrides={**demo_overrides, **overrides})
    log.info("demo: fake provider at %s", fake.base_url)
    return config, token


def _print_demo_help(host: str, port: int, token: str) -> None:
    base = f"http://{host}:{port}"
    print(
        "\n".join(
            [
                "",
                f"Demo token: {token}",
                "Try:",
                f"  curl -sN {base}/v1/completions/anthropic-messages \\",
                f"    -H 'Authorization: Bearer {token}' -H 'X-Sourcegraph-Feature: chat_completions' \\",
                "    -H 'Content-Type: application/json' \\",
                "    -d '{\"model\":\"claude-3-haiku-20240307\",\"max_tokens\":100,\"stream\":true,"
                "\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}'",
                "",
            ]
        ),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["port"] = args.port
    if args.host is not None:
        overrides["host"] = args.host
    if args.processes is not None:
        overrides["processes"] = args.processes
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.telemetry.log_level)
    if config.processes > 1:
        if args.demo:
            print("gateway: --demo runs a single process", file=sys.stderr)
            return 2
        if not config.redis.endpoint:
            print(
                "gateway: invalid configuration:\n  processes: more than one process needs redis.endpoint "
                "(REDIS_ENDPOINT), or every process would enforce the limits on its own",
                file=sys.stderr,
            )
            return 2
        return run_workers(config)
    _use_uvloop()

    async def run() -> None:
        if args.demo:
            demo_config, token = await start_demo(args.config, overrides)
            await serve(demo_config, demo_token=token)
        else:
            await serve(config)

    from composition import StartupError

    try:
        asyncio.run(run())
    except (ConfigError, StartupError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def _use_uvloop() -> None:
    if os.environ.get("CODY_GATEWAY_UVLOOP", "1") == "0":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    sys.exit(main())
