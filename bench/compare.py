"""Gateway vs direct (vs peers), in one run: the same scenario against the fake provider, through the gateway and through each peer.

    python bench/compare.py --scenario small --rounds 3 --duration 5
    python bench/compare.py --scenario small --latency-at 0.5      # + added latency at half the gateway's throughput
    python bench/compare.py --scenario unpaced --processes 2
    python bench/compare.py --scenario idle --rounds 1
    python bench/compare.py --scenario small --peer litellm         # + LiteLLM's proxy, same fake provider
    python bench/compare.py --scenario small --peer floor           # + the bare Tornado + curl relay

It starts its own stack with every production feature on (bench/stack.py: Redis
limiter, JSONL usage events, tracing exported over OTLP, metrics, JSON logs),
then alternates direct and gateway runs, several rounds, swapping the order every
round (direct-gateway, gateway-direct, ...) so that a slow patch of a noisy
machine hits both sides. Each round's ratio compares two runs seconds apart; the
summary gives the median and the spread of the ratios, never a lone absolute.

Peers (bench/peers.py) join the same rounds, the order rotating over every side:
``--peer litellm`` installs LiteLLM's proxy in its own virtualenv (once, under
~/.cache/gateway-bench), points its models at the same fake provider and sends
it the OpenAI-shaped equivalent of each request (``/v1/chat/completions``);
``--peer floor`` adds the bare relay; ``--peer-command`` any process that prints a
ready line. Each peer's column is a ratio to direct, like the gateway's. Direct is
the fake provider's Anthropic route; a peer of kind ``openai`` reaches its OpenAI
route, which costs the fake about the same per request.

Targets of issue 6 are checked for the scenarios they concern (PASS/FAIL lines).
``--env NAME=VALUE`` passes settings to the gateway (e.g. to measure one feature's
cost: ``--env CODY_GATEWAY_TELEMETRY_TRACE_POLICY=none``); ``--no-redis`` and
``--no-otlp`` turn those features off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest, procinfo
from bench import peers as peers_mod
from bench.peers import Peer, RunningPeer
from bench.stack import Stack, exit_on_sigterm, start_stack

# Issue 6's targets (2-core machine, all features on, measured by this script).
MIN_THROUGHPUT_RATIO = 0.45
MAX_ADDED_P50_S = 0.001
MAX_ADDED_P99_S = 0.005
MIN_EVENTS_PER_S_ONE_PROCESS = 25_000
MAX_ADDED_LATENESS_P99_S = 0.005
# Against the bare Tornado + curl relay in the same rounds (--peer floor).
MAX_CPU_PER_REQUEST_VS_FLOOR = 1.6
MAX_RSS_PER_STREAM_VS_FLOOR = 1.10


@dataclass(frozen=True)
class Side:
    """One column of the table: where the scenario is sent, in which request shape, and whose CPU and RSS count."""

    name: str
    url: str
    kind: str
    token: str
    pid: int
    # Processes whose CPU is accounted one by one in this side's runs (name -> pid).
    watch: dict[str, int] = field(default_factory=dict)


def stack_sides(stack: Stack) -> list[Side]:
    helpers = {"fake provider": stack.fake.pid}
    for name, key in (("redis", "redis"), ("otlp sink", "otlp")):
        if key in stack.procs:
            helpers[name] = stack.procs[key].pid
    gateway = dict(helpers)
    workers = procinfo.tree(stack.gateway.pid)
    for n, pid in enumerate(workers):
        gateway["gateway" if len(workers) == 1 else ("gateway master" if n == 0 else f"gateway worker {n}")] = pid
    return [
        Side("direct", stack.fake_url, "provider", stack.token, stack.fake.pid, helpers),
        Side("gateway", stack.gateway_url, "gateway", stack.token, stack.gateway.pid, gateway),
    ]


def peer_side(peer: RunningPeer, stack: Stack) -> Side:
    watch = {"fake provider": stack.fake.pid} | {f"{peer.name} {n}" if n else peer.name: pid for n, pid in enumerate(procinfo.tree(peer.pid))}
    return Side(peer.name, peer.url, peer.kind, peer.token, peer.pid, watch)


def run_side(side: Side, scenario: loadtest.Scenario, *, quiet: bool) -> dict[str, Any]:
    opts = loadtest.Options(
        url=side.url, scenario=scenario, kind=side.kind, token=side.token, pid=side.pid, progress=not quiet, watch=side.watch
    )
    return loadtest.run(opts)


def cpu_table(rounds: list[dict[str, dict[str, Any]]], sides: list[str]) -> tuple[str, dict[str, Any]]:
    """Cores each process kept busy (median over rounds), and requests/s per gateway core.

    On a machine shared by the load generator, the fake provider and the
    gateway, this is how one knows whether a side was limited by its own CPU
    or by what was left of the machine, and what one core of it serves.
    """
    lines = ["cores busy by process over the window (median of rounds; 1.0 = one core)"]
    summary: dict[str, Any] = {}
    for side in sides:
        names = list(rounds[0][side].get("cores_by_process", {}))
        medians = {name: _median([r[side]["cores_by_process"].get(name, 0.0) for r in rounds]) or 0.0 for name in names}
        summary[side] = medians
        total = sum(medians.values())
        parts = ", ".join(f"{name} {value:.2f}" for name, value in medians.items())
        lines.append(f"  {side:<8} {parts}; all {total:.2f}")
        served = [name for name in medians if name.startswith(side) or (side == "gateway" and name.startswith("gateway"))]
        if side != "direct" and served:
            cores = sum(medians[name] for name in served)
            rps = _median([r[side]["requests_per_s"] for r in rounds]) or 0.0
            if cores > 0:
                lines.append(f"  {'':<8} {side}: {rps / cores:,.0f} requests/s per busy core ({cores:.2f} cores for {rps:,.0f} requests/s)")
                summary[f"{side}_rps_per_core"] = rps / cores
    return "\n".join(lines), summary


def alternate(sides: list[Side], scenario: loadtest.Scenario, rounds: int, *, quiet: bool, pause_s: float) -> list[dict[str, dict[str, Any]]]:
    """Every side once per round; the order rotates every round (with two sides: A-B, B-A, ...)."""
    out: list[dict[str, dict[str, Any]]] = []
    for n in range(rounds):
        shift = n % len(sides)
        order = sides[shift:] + sides[:shift]
        pair: dict[str, dict[str, Any]] = {}
        for side in order:
            print(f"round {n + 1}/{rounds}: {side.name} ...", file=sys.stderr, flush=True)
            pair[side.name] = run_side(side, scenario, quiet=quiet)
            time.sleep(pause_s)  # let the previous run's sockets and timers settle
        out.append(pair)
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _label(side: str) -> str:
    return "the gateway" if side == "gateway" else side


def throughput_table(rounds: list[dict[str, dict[str, Any]]], stream: bool, sides: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """Requests/s of every side and its ratio to direct, per round; for streams also tokens/s (and events/s)."""
    names = sides or ["direct", "gateway"]
    others = [name for name in names if name != "direct"]
    header = f"{'round':>5}  {'direct req/s':>12}"
    for name in others:
        header += f"  {name + ' req/s':>{max(12, len(name) + 6)}}  {'ratio':>6}"
    if stream:
        header += f"  {'direct tok/s':>12}"
        for name in others:
            header += f"  {name + ' tok/s':>{max(12, len(name) + 6)}}  {'ratio':>6}"
    for name in others:
        header += f"  {name + ' ms CPU/req':>{max(13, len(name) + 11)}}  {name + ' errors':>{max(9, len(name) + 7)}}"
    lines = [header]
    ratios: dict[str, list[float]] = {name: [] for name in others}
    tok_ratios: dict[str, list[float]] = {name: [] for name in others}
    cpus: dict[str, list[float]] = {name: [] for name in others}
    errors: dict[str, int] = dict.fromkeys(others, 0)
    ev_ratios: list[float] = []
    gw_rps: list[float] = []
    gw_eps: list[float] = []
    for i, pair in enumerate(rounds, 1):
        d = pair["direct"]
        row = f"{i:>5}  {d['requests_per_s']:>12.1f}"
        for name in others:
            r = _ratio(pair[name]["requests_per_s"], d["requests_per_s"])
            if r is not None:
                ratios[name].append(r)
            row += f"  {pair[name]['requests_per_s']:>{max(12, len(name) + 6)}.1f}  {r if r is not None else 0:>6.3f}"
        if stream:
            row += f"  {d['tokens_per_s']:>12.0f}"
            for name in others:
                tr = _ratio(pair[name]["tokens_per_s"], d["tokens_per_s"])
                if tr is not None:
                    tok_ratios[name].append(tr)
                row += f"  {pair[name]['tokens_per_s']:>{max(12, len(name) + 6)}.0f}  {tr if tr is not None else 0:>6.3f}"
        for name in others:
            cpu = (pair[name].get("gateway") or {}).get("cpu_per_request_ms")
            if cpu is not None:
                cpus[name].append(cpu)
            errs = sum(pair[name]["errors"].values())
            errors[name] += errs
            row += f"  {cpu if cpu is not None else 0:>{max(13, len(name) + 11)}.3f}  {errs:>{max(9, len(name) + 7)}d}"
        if "gateway" in pair:
            g = pair["gateway"]
            gw_rps.append(g["requests_per_s"])
            if stream:
                er = _ratio(g["events_per_s"], d["events_per_s"])
                if er is not None:
                    ev_ratios.append(er)
                gw_eps.append(g["events_per_s"])
        lines.append(row)
    lines.append("")
    for name in others:
        lines.append(f"throughput ratio {name}/direct: {spread(ratios[name])}")
    if stream:
        for name in others:
            lines.append(f"tokens/s ratio {name}/direct: {spread(tok_ratios[name])}")
        if "gateway" in others:
            lines.append(f"SSE events/s ratio gateway/direct: {spread(ev_ratios)}")
            lines.append(f"gateway SSE events/s: {spread(gw_eps)}")
    for name in others:
        lines.append(f"{name} CPU per request: {spread(cpus[name])} ms")
    summary: dict[str, Any] = {
        "throughput_ratio_median": _median(ratios.get("gateway", [])),
        "throughput_ratios": ratios.get("gateway", []),
        "gateway_rps_median": _median(gw_rps),
        "events_ratio_median": _median(ev_ratios),
        "gateway_events_per_s_median": _median(gw_eps),
        "sides": {
            name: {
                "throughput_ratio_median": _median(ratios[name]),
                "throughput_ratios": ratios[name],
                "tokens_ratio_median": _median(tok_ratios[name]) if stream else None,
                "cpu_per_request_ms_median": _median(cpus[name]),
                "errors": errors[name],
            }
            for name in others
        },
    }
    return "\n".join(lines), summary


def latency_table(rounds: list[dict[str, dict[str, Any]]], key: str, label: str, sides: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """Percentiles per side and round; what each side adds to direct. The gateway's figures at the top level."""
    names = sides or ["direct", "gateway"]
    others = [name for name in names if name != "direct"]
    width = max(8, *(len(name) for name in names))
    lines = [f"{label} (ms)", f"{'round':>5}  {'side':>{width}}  {'p50':>8}  {'p90':>8}  {'p99':>8}  {'max':>8}"]
    added50: dict[str, list[float]] = {name: [] for name in others}
    added99: dict[str, list[float]] = {name: [] for name in others}
    for i, pair in enumerate(rounds, 1):
        for side in names:
            q = pair[side][key] or {}
            lines.append(f"{i:>5}  {side:>{width}}  {_ms(q.get('p50')):>8}  {_ms(q.get('p90')):>8}  {_ms(q.get('p99')):>8}  {_ms(q.get('max')):>8}")
        d = pair["direct"][key] or {}
        for name in others:
            o = pair[name][key] or {}
            if d.get("p50") is not None and o.get("p50") is not None:
                added50[name].append(o["p50"] - d["p50"])
                added99[name].append(o["p99"] - d["p99"])
    lines.append("")
    for name in others:
        lines.append(f"added by {_label(name)}, p50: {spread([a * 1000 for a in added50[name]])} ms")
        lines.append(f"added by {_label(name)}, p99: {spread([a * 1000 for a in added99[name]])} ms")
    return "\n".join(lines), {
        "added_p50_s_median": _median(added50.get("gateway", [])),
        "added_p99_s_median": _median(added99.get("gateway", [])),
        "sides": {name: {"added_p50_s_median": _median(added50[name]), "added_p99_s_median": _median(added99[name])} for name in others},
    }


def memory_lines(rounds: list[dict[str, dict[str, Any]]], sides: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    """RSS growth per open stream, for every side but direct; the gateway's worst round at the top level."""
    others = [name for name in (sides or ["direct", "gateway"]) if name != "direct"]
    per_stream: dict[str, list[float]] = {name: [] for name in others}
    lines = []
    for i, pair in enumerate(rounds, 1):
        for name in others:
            srv = pair[name].get("gateway") or {}
            growth = srv.get("rss_peak_bytes", 0) - srv.get("rss_start_bytes", 0)
            peak_open = pair[name]["open_peak"]
            value = growth / peak_open if peak_open else None
            if value is not None:
                per_stream[name].append(value)
            lines.append(
                f"round {i}: {name} RSS {srv.get('rss_start_bytes', 0) / 1e6:.1f} MB -> peak {srv.get('rss_peak_bytes', 0) / 1e6:.1f} MB"
                f" with {peak_open} streams open: {value / 1024 if value else 0:.1f} KB per open stream"
            )
    gateway = per_stream.get("gateway", [])
    return "\n".join(lines), {
        "rss_per_stream_bytes_max": max(gateway) if gateway else None,
        "rss_per_stream_bytes_max_by_side": {name: max(v) if v else None for name, v in per_stream.items()},
    }


def check(name: str, ok: bool | None, detail: str) -> str:
    verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
    return f"[{verdict}] {name}: {detail}"


def build_peers(args: argparse.Namespace) -> list[Peer]:
    peers = [peers_mod.BUILTIN[name]() for name in args.peer]
    if args.peer_command:
        peers.append(peers_mod.command_peer(args.peer_command, name=args.peer_name, kind=args.peer_kind, ready=args.peer_ready))
    names = [peer.name for peer in peers]
    if len(set(names)) != len(names) or {"direct", "gateway"} & set(names):
        raise SystemExit(f"peer names must be unique and neither 'direct' nor 'gateway': {names}")
    return peers


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n", 2)[2])
    p.add_argument("--scenario", choices=sorted(loadtest.SCENARIOS), default="small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, default=1, help="gateway worker processes")
    p.add_argument("--latency-at", type=float, default=0.0, metavar="FRACTION",
                   help="then run open loop at FRACTION of the gateway's median throughput, every side, and compare latency")  # fmt: skip
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra gateway environment")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--no-otlp", action="store_true")
    p.add_argument("--gateway-dir", type=Path, help="run the gateway from this checkout")
    p.add_argument("--peer", action="append", default=[], choices=sorted(peers_mod.BUILTIN),
                   help="also run the scenario through this peer, in the same rounds (repeatable)")  # fmt: skip
    p.add_argument("--peer-command", metavar="CMD", help="a peer of your own: command line with {port}, {fake_url}, {python}, {repo}")
    p.add_argument("--peer-name", default="custom", help="its column's name")
    p.add_argument("--peer-kind", choices=("provider", "openai"), default="provider", help="the request shape it takes")
    p.add_argument("--peer-ready", default=r"listening on", metavar="REGEX", help="the output line that says it is ready")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    p.add_argument("--json", type=Path)
    p.add_argument("--quiet", action="store_true")
    loadtest.add_scenario_flags(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    scenario = loadtest.scenario_from_args(args)
    extra_env = dict(item.split("=", 1) for item in args.env)
    peers = build_peers(args)
    for peer in peers:
        peer.install()  # before anything runs: an install takes minutes, once

    stack = start_stack(processes=args.processes, redis=not args.no_redis, otlp=not args.no_otlp, extra_env=extra_env, gateway_dir=args.gateway_dir)
    running: list[RunningPeer] = []
    out: dict[str, Any] = {"scenario": scenario.name, "settings": vars(args) | {"json": None, "gateway_dir": str(args.gateway_dir)}}
    report: list[str] = []
    try:
        for peer in peers:
            running.append(peer.start(stack.workdir, stack.fake_url))
        sides = stack_sides(stack) + [peer_side(peer, stack) for peer in running]
        names = [side.name for side in sides]
        features = f"Redis limiter {'off' if args.no_redis else 'on'}, OTLP export {'off' if args.no_otlp else 'on'}, events on, metrics on"
        report.append(f"== compare: {scenario.name} ({scenario.description}); {args.rounds} rounds; gateway processes {args.processes}; {features}")
        if extra_env:
            report.append(f"   gateway env: {extra_env}")
        for started in running:
            report.append(f"   peer {started.name}: {started.url} ({started.kind} requests), pid {started.pid}")
        s = scenario
        loop = f"open loop {s.rate:g}/s" if s.rate else "closed loop"
        length = "one request per connection" if s.per_connection else f"{s.duration_s:g}s + {s.warmup_s:g}s warm-up"
        report.append(f"   {s.connections} connections, {loop}, {length}, tokens {s.tokens} at {s.tokens_per_s or 'unpaced'}/s")
        rounds = alternate(sides, scenario, args.rounds, quiet=args.quiet, pause_s=args.pause)
        out["rounds"] = rounds
        text, summary = throughput_table(rounds, scenario.stream, names)
        report += ["", text]
        out["summary"] = summary
        text, lat = latency_table(rounds, "latency_s", "latency at full load", names)
        report += ["", text]
        if scenario.stream and scenario.tokens_per_s > 0:
            text, late = latency_table(rounds, "lateness_s", "per-event lateness", names)
            report += ["", text]
            summary["lateness"] = late
        text, cores = cpu_table(rounds, names)
        report += ["", text]
        summary["cores"] = cores
        if scenario.stream:
            text, mem = memory_lines(rounds, names)
            report += ["", text]
            summary.update(mem)

        if args.latency_at > 0 and summary["gateway_rps_median"]:
            rate = summary["gateway_rps_median"] * args.latency_at
            open_loop = replace(scenario, rate=rate)
            lat_rounds = alternate(sides, open_loop, args.rounds, quiet=args.quiet, pause_s=args.pause)
            out["latency_rounds"] = lat_rounds
            text, lat = latency_table(lat_rounds, "latency_s", f"latency at {rate:.0f} req/s ({args.latency_at:g} of the gateway's throughput)", names)
            report += ["", text]
            summary["latency_at_fraction"] = lat | {"rate": rate}
            for name in names[1:]:
                achieved = [r[name]["requests_per_s"] for r in lat_rounds]
                errors = sum(sum(r[name]["errors"].values()) for r in lat_rounds)
                report.append(f"achieved {name} rate: {spread(achieved)} req/s, {errors} errors")

        report.append("")
        report += targets(scenario, args.processes, summary)
    finally:
        for started in running:
            started.stop()
        stack.stop()
    print("\n".join(report))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


def against_floor(figure: str, ours: float | None, floor: float | None, limit: float, unit: str, scale: float) -> list[str]:
    """A target stated as a multiple of the bare relay's figure of the same rounds (none without --peer floor)."""
    if not ours or not floor:
        return []
    times = ours / floor
    detail = f"{ours * scale:.3f} {unit} against {floor * scale:.3f} {unit}: {times:.2f} x"
    return [check(f"{figure} <= {limit:g} x the bare relay's", times <= limit, detail)]


def targets(scenario: loadtest.Scenario, processes: int, summary: dict[str, Any]) -> list[str]:
    """Issue 18's targets; the ones stated against the bare relay need ``--peer floor``."""
    lines: list[str] = []
    floor = (summary.get("sides") or {}).get("floor")
    if not scenario.stream and not scenario.embeddings:
        ratio = summary.get("throughput_ratio_median")
        lines.append(check("throughput >= 0.45 of direct", None if ratio is None else ratio >= MIN_THROUGHPUT_RATIO, f"median ratio {ratio or 0:.3f}"))
        gateway_cpu = (summary.get("sides") or {}).get("gateway", {}).get("cpu_per_request_ms_median")
        floor_cpu = floor.get("cpu_per_request_ms_median") if floor else None
        lines += against_floor("gateway CPU per request", gateway_cpu, floor_cpu, MAX_CPU_PER_REQUEST_VS_FLOOR, "ms", 1.0)
        lat = summary.get("latency_at_fraction")
        if lat and lat.get("added_p50_s_median") is not None:
            a50, a99 = lat["added_p50_s_median"], lat["added_p99_s_median"]
            lines.append(check("added latency p50 < 1 ms at the reduced rate", a50 < MAX_ADDED_P50_S, f"{a50 * 1000:.2f} ms"))
            lines.append(check("added latency p99 < 5 ms at the reduced rate", a99 < MAX_ADDED_P99_S, f"{a99 * 1000:.2f} ms"))
    if scenario.stream and scenario.tokens_per_s == 0:
        eps = summary.get("gateway_events_per_s_median")
        one = processes == 1
        lines.append(check("one gateway process relays >= 25,000 SSE events/s", (eps >= MIN_EVENTS_PER_S_ONE_PROCESS) if one and eps else None, f"{eps or 0:.0f} events/s with {processes} process(es)"))
    if scenario.stream and scenario.tokens_per_s > 0:
        per = summary.get("rss_per_stream_bytes_max")
        floor_per = (summary.get("rss_per_stream_bytes_max_by_side") or {}).get("floor")
        lines += against_floor("RSS per open stream (worst rounds)", per, floor_per, MAX_RSS_PER_STREAM_VS_FLOOR, "KB", 1 / 1024)
        late = (summary.get("lateness") or {}).get("added_p99_s_median")
        lines.append(check("added per-chunk delay p99 < 5 ms", None if late is None else late < MAX_ADDED_LATENESS_P99_S, f"{(late or 0) * 1000:.2f} ms"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
