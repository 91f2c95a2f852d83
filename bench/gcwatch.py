"""Run a Python program while timing every garbage-collector pause and event-loop stall.

    BENCH_GCWATCH_OUT=gc.json python bench/gcwatch.py gateway.py --port 0

At exit (SIGTERM included: the program's own clean shutdown) it writes, per
generation, the number of collections and the pause percentiles, max and total.
With ``BENCH_STALL_MS=N`` a watcher thread also sends the program's asyncio loop
a heartbeat every 2 ms (call_soon_threadsafe); whenever one waits longer than N ms
it samples the main thread's stack (once per stall) and the report adds the stall
count, total and the stacks that were running, most frequent first. A long C call
that holds the GIL (a full GC, a big JSON encode) is seen only when it ends, so GC
pauses are reported separately above.

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


class _StallWatch:
    """Heartbeats into the running loop; samples the main thread when one is late."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold = threshold_s
        self.main_id = threading.main_thread().ident
        self.stalls: list[float] = []
        self.stacks: dict[str, list[float]] = {}
        self._acked = threading.Event()

    def _find_loop(self) -> Any:
        import asyncio

        frame = sys._current_frames().get(self.main_id or 0)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, asyncio.Runner):
                return candidate._loop  # noqa: SLF001 - a measurement tool
            frame = frame.f_back
        return None

    def _stack(self) -> str:
        import traceback

        frame = sys._current_frames().get(self.main_id or 0)
        if frame is None:
            return "?"
        lines = traceback.extract_stack(frame)[-8:]
        text = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(lines))
        # Other threads that are inside Python code right now (not parked in a
        # wait): a thread holding the GIL for long is a stall of its own kind.
        names = {t.ident: t.name for t in threading.enumerate()}
        busy = []
        for ident, other in sys._current_frames().items():
            if ident in (self.main_id, threading.get_ident()):
                continue
            top = traceback.extract_stack(other)[-1]
            if top.name in ("wait", "_wait_for_tstate_lock", "select", "poll", "get", "sleep", "accept"):
                continue
            busy.append(f"{names.get(ident, ident)}@{Path(top.filename).name}:{top.lineno}:{top.name}")
        return text + (" || busy threads: " + ", ".join(sorted(busy)) if busy else "")

    def run(self) -> None:
        loop = None
        while loop is None:
            time.sleep(0.2)
            loop = self._find_loop()
        while True:
            self._acked.clear()
            sent = time.perf_counter()
            try:
                loop.call_soon_threadsafe(self._acked.set)
            except RuntimeError:
                return  # the loop is closed
            sampled = False
            while not self._acked.wait(self.threshold if not sampled else 0.05):
                if not sampled:
                    stack = self._stack()
                    sampled = True
            if sampled:
                waited = time.perf_counter() - sent
                self.stalls.append(waited)
                self.stacks.setdefault(stack, []).append(waited)
            time.sleep(0.002)

    def report(self) -> dict[str, Any]:
        top = sorted(self.stacks.items(), key=lambda kv: -sum(kv[1]))[:15]
        return {
            "threshold_ms": self.threshold * 1000,
            "stalls": len(self.stalls),
            "total_ms": sum(self.stalls) * 1000,
            "max_ms": max(self.stalls) * 1000 if self.stalls else None,
            "stacks": [{"count": len(v), "total_ms": sum(v) * 1000, "stack": k} for k, v in top],
        }


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: gcwatch.py SCRIPT [ARGS...]")
    out = Path(os.environ.get("BENCH_GCWATCH_OUT", "gcwatch.json"))
    pauses = _Pauses()
    gc.callbacks.append(pauses.callback)
    stall_ms = os.environ.get("BENCH_STALL_MS")
    watch = _StallWatch(float(stall_ms) / 1000) if stall_ms else None
    if watch is not None:
        threading.Thread(target=watch.run, name="bench-stallwatch", daemon=True).start()

    def write() -> None:
        report = pauses.report()
        if watch is not None:
            report["loop_stalls"] = watch.report()
        out.write_text(json.dumps(report, indent=2))

    atexit.register(write)
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
