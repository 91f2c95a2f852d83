"""Load generator: runs one scenario against a gateway (or a provider) and prints a table.

    python bench/loadtest.py --url http://127.0.0.1:9992 --token sgd_... --scenario unpaced --pid GATEWAY_PID
    python bench/loadtest.py --url http://127.0.0.1:8080 --kind provider --scenario small

Scenarios (every knob can be overridden on the command line):
  small       non-streaming completions of 20 tokens, 50 connections, closed loop
  paced       streams of 300 tokens at 30 tokens/s (10 s each), 100 connections
  unpaced     streams of 300 tokens as fast as the provider writes, 50 connections
  idle        2,000 long slow streams open at once (60 tokens at 2 tokens/s), one per connection
  embeddings  embeddings requests of 32 inputs each, 50 connections

``--kind gateway`` sends Cody Gateway requests (bearer token, X-Sourcegraph-Feature,
``/v1/completions/anthropic-messages``, ``/v1/embeddings``); ``--kind provider``
sends the same bodies straight to the fake provider's Anthropic and OpenAI routes,
which is the "direct" baseline. The fake provider is steered by ``fake:`` directives
in the prompt, which the gateway forwards verbatim, so both kinds get identical
upstream behaviour.

Closed loop by default: each connection sends its next request when the last one
ends. ``--rate R`` switches to open loop: R requests/s are scheduled whatever the
server does, on a pool of ``--connections`` keep-alive connections, and latency
counts from the scheduled time (a request waiting for a free connection is late).

With ``--pid`` (the gateway's pid; its worker processes are included) the table
also gives the CPU seconds it used in the window and its peak RSS. A progress line
goes to stderr; ``--json FILE`` writes every figure for scripts (compare.py).

``--kind openai`` sends the OpenAI-shaped equivalent (``/v1/chat/completions``,
``/v1/embeddings``, bearer token) to any OpenAI-compatible proxy, e.g. a peer
started by bench/compare.py --peer litellm. Its streamed tokens are counted by
``"content":"``, which also matches a role-only first chunk when the proxy sends one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procinfo
from bench.httpload import (
    Connection,
    ResponseError,
    Stats,
    Target,
    build_request,
    connect,
    summary,
)

ANTHROPIC_MODEL = "claude-3-haiku-20240307"
EMBEDDINGS_MODEL = "text-embedding-ada-002"
TOKEN_MARKER = b"event: content_block_delta"
OPENAI_TOKEN_MARKER = b'"content":"'
KINDS = ("gateway", "provider", "openai")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    stream: bool = False
    tokens: int = 20
    tokens_per_s: float = 0.0
    connections: int = 50
    duration_s: float = 10.0
    warmup_s: float = 1.0
    ramp_s: float = 0.0  # connections are opened evenly over this time
    per_connection: int = 0  # > 0: each connection sends this many requests, then the run ends
    embeddings: bool = False
    batch: int = 32
    rate: float = 0.0  # > 0: open loop at this many requests/s
    timeout_s: float = 120.0
    directives: str = ""  # more fake-provider directives in the prompt (tool calls, thinking)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("small", "non-streaming completions", tokens=20),
        Scenario("paced", "streams at a realistic pace", stream=True, tokens=300, tokens_per_s=30,
                 connections=100, duration_s=20.0, warmup_s=2.0, ramp_s=2.0),
        Scenario("unpaced", "streams as fast as the provider writes", stream=True, tokens=300),
        Scenario("tools", "unpaced streams with a thinking block and a tool call", stream=True, tokens=300,
                 directives="fake:thinking=1 fake:tool_use=get_weather"),
        Scenario("idle", "long slow streams held open at once", stream=True, tokens=60, tokens_per_s=2,
                 connections=2000, warmup_s=0.0, ramp_s=8.0, per_connection=1),
        Scenario("embeddings", "embeddings batches", embeddings=True, batch=32),
    )
}  # fmt: skip


@dataclass
class Options:
    url: str
    scenario: Scenario
    kind: str = "gateway"
    token: str = ""
    pid: int | None = None
    path: str = ""
    progress: bool = True
    extra_prompt: str = ""
    # Other processes whose CPU over the window is reported one by one (name -> pid):
    # the fake provider, Redis, each gateway worker. Tells where the cores went.
    watch: dict[str, int] = field(default_factory=dict)


# -- requests -------------------------------------------------------------------


def prompt_text(scn: Scenario, extra: str = "") -> str:
    directives = f"fake:tokens={scn.tokens} fake:tokens_per_s={scn.tokens_per_s:g} {scn.directives}".strip()
    return f"Benchmark prompt. {directives} {extra}".strip()


def make_target(opts: Options) -> Target:
    scn = opts.scenario
    base = opts.url.rstrip("/")
    headers: dict[str, str] = {"Content-Type": "application/json"}
    if opts.kind not in KINDS:
        raise ValueError(f"unknown kind {opts.kind!r}: one of {', '.join(KINDS)}")
    marker = OPENAI_TOKEN_MARKER if opts.kind == "openai" else TOKEN_MARKER
    if scn.embeddings:
        inputs = [f"benchmark input number {i} with a few words" for i in range(scn.batch)]
        model = f"openai/{EMBEDDINGS_MODEL}" if opts.kind == "gateway" else EMBEDDINGS_MODEL
        body: dict[str, Any] = {"model": model, "input": inputs}
        path = "/v1/embeddings"
        feature = "embeddings"
    else:
        body = {
            "model": ANTHROPIC_MODEL,
            "max_tokens": max(scn.tokens, 1),
            "messages": [{"role": "user", "content": prompt_text(scn, opts.extra_prompt)}],
        }
        if scn.stream:
            body["stream"] = True
        path = {
            "provider": "/v1/messages",
            "gateway": "/v1/completions/anthropic-messages",
            "openai": "/v1/chat/completions",
        }[opts.kind]
        feature = "chat_completions"
    if opts.kind == "provider":
        headers["x-api-key"] = "bench"
        headers["anthropic-version"] = "2023-06-01"
        headers["Authorization"] = "Bearer bench"
    elif opts.kind == "openai":
        headers["Authorization"] = f"Bearer {opts.token or 'bench'}"
    else:
        headers["Authorization"] = f"Bearer {opts.token}"
        headers["X-Sourcegraph-Feature"] = feature
    host, port, raw = build_request(base + (opts.path or path), headers=headers, body=json.dumps(body).encode())
    return Target(
        host=host,
        port=port,
        request=raw,
        stream=scn.stream,
        token_marker=marker if scn.stream else b"",
        pace_per_s=scn.tokens_per_s if scn.stream else 0.0,
    )


# -- the run ----------------------------------------------------------------------


@dataclass
class Sampler:
    """Watches the gateway's process tree: CPU over the window, RSS all along."""

    pid: int | None
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    processes: int = 0
    open_at_peak: int = 0

    watch: dict[str, int] = field(default_factory=dict)
    watch_start: dict[str, float] = field(default_factory=dict)
    watch_cpu: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.watch_start = {name: cpu for name, pid in self.watch.items() if (cpu := procinfo.process_cpu_s(pid)) is not None}
        if self.pid is None:
            return
        s = procinfo.sample(self.pid)
        self.cpu_start, self.rss_start, self.rss_peak, self.processes = s.cpu_s, s.rss_bytes, s.rss_bytes, len(s.pids)

    def tick(self, open_now: int) -> None:
        if self.pid is None:
            return
        s = procinfo.sample(self.pid)
        if s.rss_bytes > self.rss_peak:
            self.rss_peak = s.rss_bytes
            self.open_at_peak = open_now
        self.processes = max(self.processes, len(s.pids))

    def stop(self) -> None:
        for name, pid in self.watch.items():
            cpu = procinfo.process_cpu_s(pid)
            if cpu is not None and name in self.watch_start:
                self.watch_cpu[name] = cpu - self.watch_start[name]
        if self.pid is None:
            return
        s = procinfo.sample(self.pid)
        self.cpu_end, self.rss_end = s.cpu_s, s.rss_bytes
        self.rss_peak = max(self.rss_peak, s.rss_bytes)


class Runner:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.scn = opts.scenario
        self.target = make_target(opts)
        self.stats = Stats()
        self.recording = False
        self.stopping = False
        self.window_start = 0.0
        self.window_end = 0.0
        self.sampler = Sampler(opts.pid, watch=dict(opts.watch))
        self.conns: set[Connection] = set()
        self._client_cpu0 = 0.0

    # Each completed request is recorded by Connection only while ``record`` is set.
    def _set_recording(self, on: bool) -> None:
        self.recording = on
        for conn in self.conns:
            conn.record = on

    async def _connection(self) -> Connection:
        conn = await connect(self.target, self.stats, self.recording)
        self.conns.add(conn)
        return conn

    def _drop(self, conn: Connection | None) -> None:
        if conn is not None:
            self.conns.discard(conn)
            if not conn.closed:
                conn.abort()

    def _error(self, kind: str) -> None:
        if self.recording:
            self.stats.errors[kind] += 1

    async def _closed_worker(self, index: int) -> None:
        scn = self.scn
        if scn.ramp_s > 0:
            await asyncio.sleep(scn.ramp_s * index / scn.connections)
        conn: Connection | None = None
        sent = 0
        while not self.stopping and (scn.per_connection == 0 or sent < scn.per_connection):
            sent += 1
            try:
                if conn is None or conn.closed:
                    self._drop(conn)
                    conn = await self._connection()
                await conn.request(time.perf_counter(), scn.timeout_s)
            except ResponseError as exc:
                if self.stopping:
                    pass  # cut at the end of the window: neither an error nor a re-send
                elif exc.kind == "stale":
                    self.stats.stale_retries += 1
                    sent -= 1
                elif not self.stopping:
                    self._error(exc.kind)
                self._drop(conn)
                conn = None
                if exc.kind.startswith("connect"):
                    await asyncio.sleep(0.05)
        self._drop(conn)

    async def _open_loop(self, deadline: float) -> None:
        scn = self.scn
        idle: asyncio.Queue[Connection | None] = asyncio.Queue()
        for _ in range(scn.connections):
            idle.put_nowait(None)
        pending: set[asyncio.Task[None]] = set()
        limit = scn.connections * 20
        interval = 1.0 / scn.rate
        start = time.perf_counter()
        k = 0

        async def one(scheduled: float) -> None:
            conn = await idle.get()
            try:
                for attempt in (1, 2):
                    try:
                        if conn is None or conn.closed:
                            self._drop(conn)
                            conn = await self._connection()
                        await conn.request(scheduled, scn.timeout_s)
                        return
                    except ResponseError as exc:
                        self._drop(conn)
                        conn = None
                        if exc.kind == "stale" and attempt == 1 and not self.stopping:
                            self.stats.stale_retries += 1
                            continue
                        if not self.stopping:
                            self._error(exc.kind)
                        return
            finally:
                idle.put_nowait(conn)

        while not self.stopping:
            scheduled = start + k * interval
            if scheduled >= deadline:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            k += 1
            if len(pending) >= limit:
                self._error("client_backlog")
                continue
            task = asyncio.ensure_future(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=scn.timeout_s)

    async def _progress(self) -> None:
        stats = self.stats
        tty = sys.stderr.isatty()
        last_t, last_ok, last_ev = time.perf_counter(), 0, 0
        t0 = last_t
        interval = 1.0 if tty else 5.0
        while True:
            await asyncio.sleep(0.25)
            self.sampler.tick(stats.open_now)
            now = time.perf_counter()
            if not self.opts.progress or now - last_t < interval:
                continue
            dt = now - last_t
            ok, ev = stats.ok, stats.events
            errors = sum(stats.errors.values())
            phase = "run" if self.recording else ("warm-up" if not self.window_start else "drain")
            line = (
                f"[{now - t0:6.1f}s {phase:7}] ok {ok:8d} ({(ok - last_ok) / dt:8.1f}/s)  open {stats.open_now:5d}"
                f"  events {(ev - last_ev) / dt:9.0f}/s  errors {errors}"
            )
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            last_t, last_ok, last_ev = now, ok, ev

    async def run(self) -> dict[str, Any]:
        scn = self.scn
        progress = asyncio.ensure_future(self._progress())
        self._client_cpu0 = procinfo.self_cpu_s()
        self.sampler.start()
        try:
            if scn.warmup_s > 0 and scn.per_connection == 0:
                # Warm-up: the same load, not recorded (connections, caches, JIT-less
                # Python's first-call costs). The window starts when it ends.
                workers_deadline = scn.warmup_s + scn.duration_s
            else:
                workers_deadline = scn.duration_s
            started = time.perf_counter()
            if scn.warmup_s <= 0 or scn.per_connection:
                self._begin_window()
            else:
                asyncio.get_running_loop().call_later(scn.warmup_s, self._begin_window)
            if scn.rate > 0:
                await self._open_loop(started + workers_deadline)
                self._end_window()
            else:
                workers = [asyncio.ensure_future(self._closed_worker(i)) for i in range(scn.connections)]
                if scn.per_connection:
                    await asyncio.wait(workers, timeout=scn.ramp_s + scn.timeout_s * scn.per_connection)
                    self._end_window()
                else:
                    await asyncio.sleep(workers_deadline)
                    self._end_window()
                self.stopping = True
                for conn in list(self.conns):
                    self._drop(conn)
                await asyncio.wait(workers, timeout=5)
                for worker in workers:
                    worker.cancel()
        finally:
            progress.cancel()
            for conn in list(self.conns):
                self._drop(conn)
        if self.opts.progress and sys.stderr.isatty():
            print(file=sys.stderr)
        return self.report()

    def _begin_window(self) -> None:
        self.window_start = time.perf_counter()
        self.stats.events = self.stats.tokens = self.stats.body_bytes = 0
        self.sampler.start()
        self._client_cpu0 = procinfo.self_cpu_s()
        self._set_recording(True)

    def _end_window(self) -> None:
        if not self.recording:
            return
        self.window_end = time.perf_counter()
        self.sampler.stop()
        self._client_cpu = procinfo.self_cpu_s() - self._client_cpu0
        self._set_recording(False)
        self.stopping = True

    def report(self) -> dict[str, Any]:
        stats, scn, smp = self.stats, self.scn, self.sampler
        window = max(1e-9, self.window_end - self.window_start)
        result: dict[str, Any] = {
            "scenario": scn.name,
            "settings": asdict(scn),
            "url": self.opts.url,
            "kind": self.opts.kind,
            "window_s": window,
            "ok": stats.ok,
            "requests_per_s": stats.ok / window,
            "errors": dict(stats.errors),
            "ttfb_s": summary(stats.ttfb),
            "latency_s": summary(stats.latency),
            "events": stats.events,
            "events_per_s": stats.events / window,
            "tokens": stats.tokens,
            "tokens_per_s": stats.tokens / window,
            "body_bytes_per_s": stats.body_bytes / window,
            "lateness_s": summary(stats.lateness) if scn.stream and scn.tokens_per_s > 0 else None,
            "open_peak": stats.open_peak,
            "connects": stats.connects,
            "stale_keepalive_retries": stats.stale_retries,
            "client_cpu_s": getattr(self, "_client_cpu", 0.0),
            # Cores each watched process kept busy over the window (1.0: one core).
            "cores_by_process": {name: cpu / window for name, cpu in smp.watch_cpu.items()}
            | {"load generator": getattr(self, "_client_cpu", 0.0) / window},
        }
        if smp.pid is not None:
            cpu = smp.cpu_end - smp.cpu_start
            result["gateway"] = {
                "pid": smp.pid,
                "processes": smp.processes,
                "cpu_s": cpu,
                "cpu_per_request_ms": 1000 * cpu / stats.ok if stats.ok else None,
                "cpu_share_of_one_core": cpu / window,
                "rss_start_bytes": smp.rss_start,
                "rss_peak_bytes": smp.rss_peak,
                "rss_end_bytes": smp.rss_end,
                "rss_per_open_stream_bytes": (
                    (smp.rss_peak - smp.rss_start) / smp.open_at_peak if smp.open_at_peak and scn.stream else None
                ),
                "open_at_rss_peak": smp.open_at_peak,
            }
        return result


# -- output -----------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f} MB"


def format_table(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows: list[tuple[str, str]] = []
    mode = f"open loop {s['rate']:g}/s" if s["rate"] else ("one request per connection" if s["per_connection"] else "closed loop")
    rows.append(("scenario", f"{r['scenario']} ({mode}, {s['connections']} connections)"))
    rows.append(("target", f"{r['url']} ({r['kind']})"))
    rows.append(("window", f"{r['window_s']:.1f} s"))
    rows.append(("requests", f"{r['ok']} ok, {r['requests_per_s']:.1f}/s"))
    errors = r["errors"]
    rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) if errors else "none"))
    if r.get("connects") is not None:
        stale = r.get("stale_keepalive_retries") or 0
        rows.append(("connections opened", f"{r['connects']}" + (f" ({stale} requests re-sent after the server closed a kept-alive connection)" if stale else "")))
    for label, key in (("TTFB ms", "ttfb_s"), ("latency ms", "latency_s")):
        q = r[key]
        rows.append((label, f"p50 {_ms(q['p50'])}  p90 {_ms(q['p90'])}  p99 {_ms(q['p99'])}  max {_ms(q['max'])}"))
    if s["stream"]:
        rows.append(("SSE events", f"{r['events']}, {r['events_per_s']:.0f}/s"))
        rows.append(("tokens relayed", f"{r['tokens']}, {r['tokens_per_s']:.0f}/s"))
        if r.get("lateness_s"):
            q = r["lateness_s"]
            rows.append(("event lateness ms", f"p50 {_ms(q['p50'])}  p90 {_ms(q['p90'])}  p99 {_ms(q['p99'])}  max {_ms(q['max'])}"))
        rows.append(("open streams", f"peak {r['open_peak']}"))
    gw = r.get("gateway")
    if gw:
        cpu = (
            f"{gw['cpu_s']:.2f} s ({100 * gw['cpu_share_of_one_core']:.0f}% of one core, "
            f"{gw['cpu_per_request_ms'] or 0:.3f} ms per request), {gw['processes']} process(es)"
        )
        rows.append(("server CPU", cpu))
        per_stream = gw.get("rss_per_open_stream_bytes")
        extra = f", {per_stream / 1024:.1f} KB per open stream at {gw['open_at_rss_peak']} open" if per_stream else ""
        rows.append(("server RSS", f"peak {_mb(gw['rss_peak_bytes'])} (start {_mb(gw['rss_start_bytes'])}, end {_mb(gw['rss_end_bytes'])}){extra}"))
    rows.append(("client CPU", f"{r['client_cpu_s']:.2f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:9992")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="small")
    p.add_argument("--kind", choices=KINDS, default="gateway", help="request shape: Cody Gateway, the fake provider direct, an OpenAI-compatible proxy")
    p.add_argument("--token", default=os.environ.get("BENCH_TOKEN", ""), help="gateway bearer token (or BENCH_TOKEN)")
    p.add_argument("--pid", type=int, help="gateway pid: report its (and its workers') CPU and RSS")
    p.add_argument("--path", default="", help="override the request path")
    add_scenario_flags(p)
    p.add_argument("--json", type=Path, help="also write all figures to this file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def add_scenario_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connections", "-c", type=int)
    p.add_argument("--duration", "-d", type=float, help="seconds of measurement (after the warm-up)")
    p.add_argument("--warmup", type=float, help="seconds of unrecorded load first")
    p.add_argument("--ramp", type=float, help="open the connections evenly over this many seconds")
    p.add_argument("--per-connection", type=int, help="requests per connection, then stop (0: until --duration)")
    p.add_argument("--rate", type=float, help="open loop: requests/s (0: closed loop)")
    p.add_argument("--tokens", type=int)
    p.add_argument("--tokens-per-s", type=float)
    p.add_argument("--batch", type=int, help="embeddings inputs per request")
    p.add_argument("--timeout", type=float, help="per-request timeout, seconds")


def scenario_from_args(args: argparse.Namespace, name: str | None = None) -> Scenario:
    scn = SCENARIOS[name or args.scenario]
    changes = {
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "ramp_s": args.ramp,
        "per_connection": args.per_connection,
        "rate": args.rate,
        "tokens": args.tokens,
        "tokens_per_s": args.tokens_per_s,
        "batch": args.batch,
        "timeout_s": args.timeout,
    }
    return replace(scn, **{k: v for k, v in changes.items() if v is not None})


def run(opts: Options) -> dict[str, Any]:
    """One scenario, start to finish, in a fresh event loop (uvloop when installed)."""
    if opts.kind == "gateway" and not opts.token:
        raise SystemExit("--token is required for --kind gateway")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(Runner(opts).run())
    return uvloop.run(Runner(opts).run())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options(
        url=args.url,
        scenario=scenario_from_args(args),
        kind=args.kind,
        token=args.token,
        pid=args.pid,
        path=args.path,
        progress=not args.quiet,
    )
    result = run(opts)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
