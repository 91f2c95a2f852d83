"""Profile the gateway under a scenario: py-spy (sampling, attached by pid) or pyinstrument.

    python bench/profile.py --scenario small --duration 10
    python bench/profile.py --scenario unpaced --rate 150 --out var/profile-unpaced
    python bench/profile.py --scenario small --profiler pyinstrument

It starts the benchmark stack with every feature on (bench/stack.py), drives the
scenario with bench/loadtest.py from this process, and meanwhile samples the
gateway with ``py-spy record --nonblocking`` (the gateway is never paused; all
threads; worker processes too with --processes). The raw stacks are written to
OUT/pyspy.raw and summarised (bench/pyspy_summary.py) into OUT/summary.txt:
share per thread, per area, and the top functions by self and inclusive time.

``--profiler pyinstrument`` runs the gateway under ``python -m pyinstrument``
instead; its text report is written when the gateway stops (OUT/pyinstrument.txt).
Both profilers are development tools: ``pip install py-spy pyinstrument``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadtest, pyspy_summary
from bench.stack import exit_on_sigterm, start_stack


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--scenario", choices=sorted(loadtest.SCENARIOS), default="small")
    p.add_argument("--profiler", choices=("py-spy", "pyinstrument"), default="py-spy")
    p.add_argument("--out", type=Path, default=Path("var/profile"))
    p.add_argument("--sample-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--gateway-dir", type=Path)
    p.add_argument("--top", type=int, default=30)
    loadtest.add_scenario_flags(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    scenario = loadtest.scenario_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    extra_env = dict(item.split("=", 1) for item in args.env)

    prefix = None
    report_path = args.out / "pyinstrument.txt"
    if args.profiler == "pyinstrument":
        prefix = [sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(report_path.resolve())]
    elif shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")

    stack = start_stack(processes=args.processes, extra_env=extra_env, gateway_prefix=prefix, gateway_dir=args.gateway_dir)
    spy: subprocess.Popen[str] | None = None
    raw_path = args.out / "pyspy.raw"
    try:
        if args.profiler == "py-spy":
            # Sample the measured window only: start after the warm-up.
            duration = max(1, int(scenario.duration_s if not scenario.per_connection else scenario.ramp_s + 30))
            cmd = ["py-spy", "record", "--pid", str(stack.gateway.pid), "--rate", str(args.sample_rate), "--duration", str(duration),
                   "--format", "raw", "--output", str(raw_path), "--nonblocking", "--threads"]  # fmt: skip
            if args.processes > 1:
                cmd.append("--subprocesses")
            delay = scenario.warmup_s if not scenario.per_connection else scenario.ramp_s
            spy = subprocess.Popen(
                ["sh", "-c", f"sleep {delay} && exec \"$@\"", "sh", *cmd],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        result = loadtest.run(
            loadtest.Options(url=stack.gateway_url, scenario=scenario, token=stack.token, pid=stack.gateway.pid, progress=True)
        )
        if spy is not None:
            out, _ = spy.communicate(timeout=120)
            if spy.returncode != 0:
                print(out, file=sys.stderr)
    finally:
        stack.stop()
    table = loadtest.format_table(result)
    print(table)
    (args.out / "loadtest.txt").write_text(table + "\n")
    if args.profiler == "py-spy":
        prof = pyspy_summary.parse(raw_path.read_text(errors="replace").splitlines())
        text = pyspy_summary.render(prof, args.top, title=f"gateway under '{scenario.name}' ({scenario.description})")
        (args.out / "summary.txt").write_text(text + "\n")
        print()
        print(text)
        print(f"\nraw stacks: {raw_path} (flamegraph.pl or speedscope can render them)")
    else:
        deadline = time.monotonic() + 10
        while not report_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"\npyinstrument report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
