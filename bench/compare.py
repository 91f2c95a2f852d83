"""Gateway vs direct, in one run: the same scenario against the fake provider and through the gateway.

    python bench/compare.py --scenario small --rounds 3 --duration 5
    python bench/compare.py --scenario small --latency-at 0.5      # + added latency at half the gateway's throughput
    python bench/compare.py --scenario unpaced --processes 2
    python bench/compare.py --scenario idle --rounds 1

It starts its own stack with every production feature on (bench/stack.py: Redis
limiter, JSONL usage events, tracing exported over OTLP, metrics, JSON logs),
then alternates direct and gateway runs, several rounds, swapping the order every
round (direct-gateway, gateway-direct, ...) so that a slow patch of a noisy
machine hits both sides. Each round's ratio compares two runs seconds apart; the
summary gives the median and the spread of the ratios, never a lone absolute.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest
from bench.stack import Stack, exit_on_sigterm, start_stack

# Issue 6's targets (2-core machine, all features on, measured by this script).
MIN_THROUGHPUT_RATIO = 0.45
MAX_ADDED_P50_S = 0.001
MAX_ADDED_P99_S = 0.005
MIN_EVENTS_PER_S_ONE_PROCESS = 25_000
MAX_RSS_PER_STREAM_BYTES = 30 * 1024
MAX_ADDED_LATENESS_P99_S = 0.005


def run_side(stack: Stack, side: str, scenario: loadtest.Scenario, *, engine: str, quiet: bool) -> dict[str, Any]:
    direct = side == "direct"
    opts = loadtest.Options(
        url=stack.fake_url if direct else stack.gateway_url,
        scenario=scenario,
        kind="provider" if direct else "gateway",
        token=stack.token,
        pid=stack.fake.pid if direct else stack.gateway.pid,
        progress=not quiet,
        engine=engine,
    )
    return loadtest.run(opts)


def alternate(stack: Stack, scenario: loadtest.Scenario, rounds: int, *, engine: str, quiet: bool, pause_s: float) -> list[dict[str, dict[str, Any]]]:
    out: list[dict[str, dict[str, Any]]] = []
    for n in range(rounds):
        order = ("direct", "gateway") if n % 2 == 0 else ("gateway", "direct")
        pair: dict[str, dict[str, Any]] = {}
        for side in order:
            print(f"round {n + 1}/{rounds}: {side} ...", file=sys.stderr, flush=True)
            pair[side] = run_side(stack, side, scenario, engine=engine, quiet=quiet)
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


def throughput_table(rounds: list[dict[str, dict[str, Any]]], stream: bool) -> tuple[str, dict[str, Any]]:
    lines = []
    header = f"{'round':>5}  {'direct req/s':>12}  {'gateway req/s':>13}  {'ratio':>6}"
    if stream:
        header += f"  {'direct ev/s':>11}  {'gateway ev/s':>12}  {'ratio':>6}"
    header += f"  {'gw ms CPU/req':>13}  {'gw errors':>9}"
    lines.append(header)
    ratios, ev_ratios, gw_rps, gw_eps = [], [], [], []
    for i, pair in enumerate(rounds, 1):
        d, g = pair["direct"], pair["gateway"]
        r = _ratio(g["requests_per_s"], d["requests_per_s"])
        ratios.append(r) if r is not None else None
        gw_rps.append(g["requests_per_s"])
        row = f"{i:>5}  {d['requests_per_s']:>12.1f}  {g['requests_per_s']:>13.1f}  {r if r is not None else 0:>6.3f}"
        if stream:
            er = _ratio(g["events_per_s"], d["events_per_s"])
            ev_ratios.append(er) if er is not None else None
            gw_eps.append(g["events_per_s"])
            row += f"  {d['events_per_s']:>11.0f}  {g['events_per_s']:>12.0f}  {er if er is not None else 0:>6.3f}"
        cpu = (g.get("gateway") or {}).get("cpu_per_request_ms")
        errors = sum(g["errors"].values())
        row += f"  {cpu if cpu is not None else 0:>13.3f}  {errors:>9d}"
        lines.append(row)
    lines.append("")
    lines.append(f"throughput ratio gateway/direct: {spread(ratios)}")
    if stream:
        lines.append(f"SSE events/s ratio gateway/direct: {spread(ev_ratios)}")
        lines.append(f"gateway SSE events/s: {spread(gw_eps)}")
    summary = {
        "throughput_ratio_median": statistics.median(ratios) if ratios else None,
        "throughput_ratios": ratios,
        "gateway_rps_median": statistics.median(gw_rps) if gw_rps else None,
        "events_ratio_median": statistics.median(ev_ratios) if ev_ratios else None,
        "gateway_events_per_s_median": statistics.median(gw_eps) if gw_eps else None,
    }
    return "\n".join(lines), summary


def latency_table(rounds: list[dict[str, dict[str, Any]]], key: str, label: str) -> tuple[str, dict[str, Any]]:
    lines = [f"{label} (ms)", f"{'round':>5}  {'side':>8}  {'p50':>8}  {'p90':>8}  {'p99':>8}  {'max':>8}"]
    added50, added99 = [], []
    for i, pair in enumerate(rounds, 1):
        for side in ("direct", "gateway"):
            q = pair[side][key] or {}
            lines.append(f"{i:>5}  {side:>8}  {_ms(q.get('p50')):>8}  {_ms(q.get('p90')):>8}  {_ms(q.get('p99')):>8}  {_ms(q.get('max')):>8}")
        d, g = pair["direct"][key] or {}, pair["gateway"][key] or {}
        if d.get("p50") is not None and g.get("p50") is not None:
            added50.append(g["p50"] - d["p50"])
            added99.append(g["p99"] - d["p99"])
    lines.append("")
    lines.append(f"added by the gateway, p50: {spread([a * 1000 for a in added50])} ms")
    lines.append(f"added by the gateway, p99: {spread([a * 1000 for a in added99])} ms")
    return "\n".join(lines), {
        "added_p50_s_median": statistics.median(added50) if added50 else None,
        "added_p99_s_median": statistics.median(added99) if added99 else None,
    }


def memory_lines(rounds: list[dict[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    per_stream = []
    lines = []
    for i, pair in enumerate(rounds, 1):
        gw = pair["gateway"].get("gateway") or {}
        growth = gw.get("rss_peak_bytes", 0) - gw.get("rss_start_bytes", 0)
        peak_open = pair["gateway"]["open_peak"]
        value = growth / peak_open if peak_open else None
        if value is not None:
            per_stream.append(value)
        lines.append(
            f"round {i}: gateway RSS {gw.get('rss_start_bytes', 0) / 1e6:.1f} MB -> peak {gw.get('rss_peak_bytes', 0) / 1e6:.1f} MB"
            f" with {peak_open} streams open: {value / 1024 if value else 0:.1f} KB per open stream"
        )
    return "\n".join(lines), {"rss_per_stream_bytes_max": max(per_stream) if per_stream else None}


def check(name: str, ok: bool | None, detail: str) -> str:
    verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
    return f"[{verdict}] {name}: {detail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--scenario", choices=sorted(loadtest.SCENARIOS), default="small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, default=1, help="gateway worker processes")
    p.add_argument("--engine", choices=("python", "wrk"), default="python")
    p.add_argument("--latency-at", type=float, default=0.0, metavar="FRACTION",
                   help="then run open loop at FRACTION of the gateway's median throughput, both sides, and compare latency")  # fmt: skip
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra gateway environment")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--no-otlp", action="store_true")
    p.add_argument("--gateway-dir", type=Path, help="run the gateway from this checkout")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between runs")
    p.add_argument("--json", type=Path)
    p.add_argument("--quiet", action="store_true")
    loadtest.add_scenario_flags(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    scenario = loadtest.scenario_from_args(args)
    extra_env = dict(item.split("=", 1) for item in args.env)

    stack = start_stack(processes=args.processes, redis=not args.no_redis, otlp=not args.no_otlp, extra_env=extra_env, gateway_dir=args.gateway_dir)
    out: dict[str, Any] = {"scenario": scenario.name, "settings": vars(args) | {"json": None, "gateway_dir": str(args.gateway_dir)}}
    report: list[str] = []
    try:
        features = f"Redis limiter {'off' if args.no_redis else 'on'}, OTLP export {'off' if args.no_otlp else 'on'}, events on, metrics on"
        report.append(f"== compare: {scenario.name} ({scenario.description}); {args.rounds} rounds; gateway processes {args.processes}; {features}")
        if extra_env:
            report.append(f"   gateway env: {extra_env}")
        s = scenario
        report.append(
            f"   {s.connections} connections, {'open loop %g/s' % s.rate if s.rate else 'closed loop'}, "
            f"{'one request per connection' if s.per_connection else '%gs + %gs warm-up' % (s.duration_s, s.warmup_s)}, "
            f"tokens {s.tokens} at {s.tokens_per_s or 'unpaced'}/s, engine {args.engine}"
        )
        rounds = alternate(stack, scenario, args.rounds, engine=args.engine, quiet=args.quiet, pause_s=args.pause)
        out["rounds"] = rounds
        text, summary = throughput_table(rounds, scenario.stream)
        report += ["", text]
        out["summary"] = summary
        if args.engine == "python":
            text, lat = latency_table(rounds, "latency_s", "latency at full load")
            report += ["", text]
            if scenario.stream and scenario.tokens_per_s > 0:
                text, late = latency_table(rounds, "lateness_s", "per-event lateness")
                report += ["", text]
                summary["lateness"] = late
        if scenario.stream:
            text, mem = memory_lines(rounds)
            report += ["", text]
            summary.update(mem)

        if args.latency_at > 0 and summary["gateway_rps_median"]:
            rate = summary["gateway_rps_median"] * args.latency_at
            open_loop = replace(scenario, rate=rate)
            lat_rounds = alternate(stack, open_loop, args.rounds, engine="python", quiet=args.quiet, pause_s=args.pause)
            out["latency_rounds"] = lat_rounds
            text, lat = latency_table(lat_rounds, "latency_s", f"latency at {rate:.0f} req/s ({args.latency_at:g} of the gateway's throughput)")
            report += ["", text]
            summary["latency_at_fraction"] = lat | {"rate": rate}
            achieved = [r["gateway"]["requests_per_s"] for r in lat_rounds]
            report.append(f"achieved gateway rate: {spread(achieved)} req/s")

        report.append("")
        report += targets(scenario, args.processes, summary)
    finally:
        stack.stop()
    print("\n".join(report))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


def targets(scenario: loadtest.Scenario, processes: int, summary: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if not scenario.stream and not scenario.embeddings:
        ratio = summary.get("throughput_ratio_median")
        lines.append(check("throughput >= 0.45 of direct", None if ratio is None else ratio >= MIN_THROUGHPUT_RATIO, f"median ratio {ratio or 0:.3f}"))
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
        lines.append(check("RSS per open stream < 30 KB", None if per is None else per < MAX_RSS_PER_STREAM_BYTES, f"{(per or 0) / 1024:.1f} KB"))
        late = (summary.get("lateness") or {}).get("added_p99_s_median")
        lines.append(check("added per-chunk delay p99 < 5 ms", None if late is None else late < MAX_ADDED_LATENESS_P99_S, f"{(late or 0) * 1000:.2f} ms"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
