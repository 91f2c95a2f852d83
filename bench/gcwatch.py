"""Run a Python program while timing every garbage-collector pause; try GC settings without editing it.

    BENCH_GCWATCH_OUT=gc.json python bench/gcwatch.py gateway.py --port 0

At exit (SIGTERM included: the program's own clean shutdown) it writes, per
generation, the number of collections and the pause percentiles, max and total.
Knobs, to measure a remedy before anyone changes the program:
- ``BENCH_GC_THRESHOLD=a,b,c``: ``gc.set_threshold(a, b, c)`` at start;
- ``BENCH_GC_FREEZE_AFTER_S=N``: ``gc.freeze()`` N seconds after start (after
  the program has built its long-lived objects), so that full collections stop
  walking them.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any


class _Pauses:
    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.by_gen[info["generation"]].append(time.perf_counter() - self._t0)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gen, values in self.by_gen.items():
            ordered = sorted(values)
            n = len(ordered)

            def pct(p: float) -> float | None:
                return ordered[min(n - 1, int(p * n / 100))] * 1000 if n else None

            out[f"gen{gen}"] = {
                "collections": n,
                "p50_ms": pct(50),
                "p99_ms": pct(99),
                "max_ms": ordered[-1] * 1000 if n else None,
                "total_ms": sum(ordered) * 1000,
            }
        out["frozen_objects"] = gc.get_freeze_count()
        out["threshold"] = gc.get_threshold()
        return out


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: gcwatch.py SCRIPT [ARGS...]")
    out = Path(os.environ.get("BENCH_GCWATCH_OUT", "gcwatch.json"))
    pauses = _Pauses()
    gc.callbacks.append(pauses.callback)
    atexit.register(lambda: out.write_text(json.dumps(pauses.report(), indent=2)))
    threshold = os.environ.get("BENCH_GC_THRESHOLD")
    if threshold:
        gc.set_threshold(*(int(x) for x in threshold.split(",")))
    freeze_after = os.environ.get("BENCH_GC_FREEZE_AFTER_S")
    if freeze_after:
        timer = threading.Timer(float(freeze_after), gc.freeze)
        timer.daemon = True
        timer.start()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
