"""A/B: the same scenario through two gateway checkouts (or two settings), alternating, in one run.

    python bench/ab.py --a . --b /tmp/patched-checkout --scenario small --rounds 4
    python bench/ab.py --a . --b . --b-env CODY_GATEWAY_TELEMETRY_TRACE_POLICY=none --scenario small

To measure an optimisation before it lands: copy the tree (``git archive HEAD | tar -x -C DIR``),
change the copy, and run this. Each side gets its own stack with every feature on
(bench/stack.py); rounds alternate A-B, B-A, ... so that a noisy patch of the
machine hits both. Printed per round and as medians: requests/s, SSE events/s,
the gateway's CPU per request and per SSE event, RSS growth per open stream,
latency and per-event lateness percentiles, and the B/A ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest
from bench.stack import Stack, exit_on_sigterm, start_stack


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    gw = r.get("gateway") or {}
    cpu = gw.get("cpu_s")
    events = r["events"]
    growth = gw.get("rss_peak_bytes", 0) - gw.get("rss_start_bytes", 0)
    late = r.get("lateness_s") or {}
    return {
        "req/s": r["requests_per_s"],
        "events/s": r["events_per_s"] if r["settings"]["stream"] else None,
        "CPU ms/req": gw.get("cpu_per_request_ms"),
        "CPU us/event": (1e6 * cpu / events) if cpu is not None and events else None,
        "KB/open stream": (growth / 1024 / r["open_peak"]) if r["settings"]["stream"] and r["open_peak"] else None,
        "latency p50 ms": (r["latency_s"]["p50"] or 0) * 1000 if r["latency_s"]["p50"] is not None else None,
        "latency p99 ms": (r["latency_s"]["p99"] or 0) * 1000 if r["latency_s"]["p99"] is not None else None,
        "lateness p99 ms": late["p99"] * 1000 if late.get("p99") is not None else None,
        "errors": float(sum(r["errors"].values())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    p.add_argument("--b", type=Path, required=True, help="checkout B")
    p.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--scenario", choices=sorted(loadtest.SCENARIOS), default="small")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--fresh", action="store_true", help="a new stack for every run (memory figures from a fresh process)")
    p.add_argument("--quiet", action="store_true")
    loadtest.add_scenario_flags(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    scenario = loadtest.scenario_from_args(args)
    envs = {"A": dict(e.split("=", 1) for e in args.a_env), "B": dict(e.split("=", 1) for e in args.b_env)}
    dirs = {"A": args.a.resolve(), "B": args.b.resolve()}
    stacks: dict[str, Stack] = {}

    def stack_for(side: str) -> Stack:
        if args.fresh and side in stacks:
            stacks.pop(side).stop()
        if side not in stacks:
            stacks[side] = start_stack(extra_env=envs[side], gateway_dir=dirs[side])
        return stacks[side]

    rows: dict[str, list[dict[str, float | None]]] = {"A": [], "B": []}
    try:
        for n in range(args.rounds):
            for side in ("A", "B") if n % 2 == 0 else ("B", "A"):
                print(f"round {n + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                st = stack_for(side)
                opts = loadtest.Options(url=st.gateway_url, scenario=scenario, token=st.token, pid=st.gateway.pid, progress=not args.quiet)
                rows[side].append(figures(loadtest.run(opts)))
                time.sleep(1)
    finally:
        for st in stacks.values():
            st.stop()

    keys = [k for k in rows["A"][0] if any(r[k] is not None for r in rows["A"] + rows["B"])]
    print(f"== A/B: {scenario.name}, {args.rounds} rounds; A = {dirs['A']} {envs['A'] or ''}; B = {dirs['B']} {envs['B'] or ''}")
    print(f"{'figure':<16} {'A median':>10} {'B median':>10} {'B/A':>7}   per round A | B")
    for k in keys:
        a = [v for r in rows["A"] if (v := r[k]) is not None]
        b = [v for r in rows["B"] if (v := r[k]) is not None]
        ma = statistics.median(a) if a else None
        mb = statistics.median(b) if b else None
        ratio = f"{mb / ma:7.3f}" if ma and mb is not None else "      -"
        per = " ".join(f"{v:.1f}" for v in a) + " | " + " ".join(f"{v:.1f}" for v in b)
        print(f"{k:<16} {ma if ma is not None else float('nan'):>10.2f} {mb if mb is not None else float('nan'):>10.2f} {ratio}   {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
