"""The benchmark harness runs: tiny scenarios, seconds each. No figure is asserted, only that they exist.

Benchmarks themselves are scripts (bench/compare.py, bench/soak.py, bench/profile.py),
never timed tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bench import loadtest, peers, procinfo, pyspy_summary
from bench.httpload import Connection, Stats, Target
from bench.stack import Stack, start_stack
from fakes.processes import ManagedProcess, NotReady, ProcessExited, start_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(workdir=tmp_path_factory.mktemp("bench-stack"))
    yield s
    s.stop()


def tiny(name: str, **changes: object) -> loadtest.Scenario:
    base: dict[str, object] = {"connections": 2, "duration_s": 1.0, "warmup_s": 0.2, "ramp_s": 0.0, "timeout_s": 20.0}
    if loadtest.SCENARIOS[name].per_connection:
        base.update(connections=3, ramp_s=0.2)
    return replace(loadtest.SCENARIOS[name], **(base | changes))  # type: ignore[arg-type]


def run(stack: Stack, scenario: loadtest.Scenario, kind: str, **extra: object) -> dict:
    direct = kind in ("provider", "openai")  # "openai": the fake provider's OpenAI route, as a peer would reach it
    opts = loadtest.Options(
        url=stack.fake_url if direct else stack.gateway_url,
        scenario=scenario,
        kind=kind,
        token=stack.token,
        pid=stack.fake.pid if direct else stack.gateway.pid,
        progress=False,
        **extra,  # type: ignore[arg-type]
    )
    return loadtest.run(opts)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["provider", "gateway"])
def test_small_completions_both_ways(stack: Stack, kind: str) -> None:
    result = run(stack, tiny("small"), kind)
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] > 0 and result["requests_per_s"] > 0
    assert result["latency_s"]["p99"] >= result["latency_s"]["p50"] > 0
    assert result["ttfb_s"]["p50"] > 0
    gw = result["gateway"]
    assert gw["cpu_s"] >= 0 and gw["rss_peak_bytes"] > 0
    table = loadtest.format_table(result)
    for label in ("requests", "TTFB ms", "latency ms", "server CPU", "server RSS", "errors"):
        assert label in table


@pytest.mark.timeout(60)
def test_unpaced_stream_counts_events_and_tokens(stack: Stack) -> None:
    result = run(stack, tiny("unpaced", tokens=25), "gateway")
    assert result["errors"] == {}, result["errors"]
    ok = result["ok"]
    assert ok > 0
    # Each Anthropic stream: 25 content deltas, and 31 events in all (message_start,
    # content_block_start, ping, 25 deltas, content_block_stop, message_delta, message_stop).
    # Counting is live, so streams cut at the window's edges make it approximate.
    assert result["tokens"] >= 0.8 * 25 * ok
    assert result["events"] >= result["tokens"]
    assert "SSE events" in loadtest.format_table(result)


@pytest.mark.timeout(60)
def test_paced_streams_measure_lateness_and_memory(stack: Stack) -> None:
    scenario = tiny("idle", tokens=5, tokens_per_s=20)
    result = run(stack, scenario, "gateway")
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] == 3
    assert result["tokens"] == 15
    late = result["lateness_s"]
    assert late is not None and late["p50"] is not None and late["p50"] >= 0
    assert result["open_peak"] >= 1
    assert "event lateness ms" in loadtest.format_table(result)


@pytest.mark.timeout(60)
def test_open_loop_rate(stack: Stack) -> None:
    result = run(stack, tiny("small", rate=50.0, connections=4), "gateway")
    assert result["errors"] == {}, result["errors"]
    # About 50 requests in the one-second window.
    assert 25 <= result["ok"] <= 75


@pytest.mark.timeout(60)
def test_errors_are_counted_by_kind(stack: Stack) -> None:
    bad = replace(stack, token="sgd_" + "0" * 64)
    result = run(bad, tiny("small"), "gateway")
    assert result["ok"] == 0
    assert set(result["errors"]) == {"http_401"}


@pytest.mark.timeout(60)
def test_embeddings_scenario_runs(stack: Stack) -> None:
    result = run(stack, tiny("embeddings", batch=4), "provider")
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["small", "unpaced"])
def test_openai_kind_against_the_fakes_openai_route(stack: Stack, scenario: str) -> None:
    # The request shape a peer of kind "openai" (LiteLLM's proxy) gets; the fake provider answers it too.
    result = run(stack, tiny(scenario, tokens=10), "openai")
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] > 0
    if scenario == "unpaced":
        # 10 content chunks, plus the role-only first chunk that the marker also matches.
        assert result["tokens"] >= 0.8 * 10 * result["ok"]


def test_litellm_config_points_at_the_fake_provider() -> None:
    config = peers.litellm_config("http://127.0.0.1:1234", "sk-bench-x")
    models = {m["model_name"]: m["litellm_params"] for m in config["model_list"]}  # type: ignore[attr-defined]
    assert models[loadtest.ANTHROPIC_MODEL]["model"] == f"openai/{loadtest.ANTHROPIC_MODEL}"
    assert models[loadtest.ANTHROPIC_MODEL]["api_base"] == "http://127.0.0.1:1234/v1"
    assert models[loadtest.EMBEDDINGS_MODEL]["model"] == f"openai/{loadtest.EMBEDDINGS_MODEL}"
    assert config["general_settings"] == {"master_key": "sk-bench-x"}


@pytest.mark.timeout(60)
def test_a_peer_starts_answers_and_stops(stack: Stack, tmp_path: Path) -> None:
    # A stand-in that is cheap to start: the bare relay, given as a command of one's own.
    peer = peers.command_peer("{python} {repo}/bench/floor_proxy.py --port {port} --upstream {fake_url}", name="relay", ready="floor proxy listening on")
    running = peer.start(tmp_path, stack.fake_url)
    try:
        result = run(replace(stack, fake_url=running.url), tiny("small"), "provider")
        assert result["errors"] == {}, result["errors"]
        assert result["ok"] > 0
    finally:
        running.stop()
    assert running.process.proc.returncode is not None


@pytest.mark.timeout(30)
def test_a_peer_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    peer = peers.command_peer("{python} -c 'import time; print(\"starting\", flush=True); time.sleep(60)'", name="mute", ready="never printed")
    peer.start_timeout_s = 1.0
    with pytest.raises(NotReady) as excinfo:
        peer.start(tmp_path, "http://127.0.0.1:1")
    assert "starting" in str(excinfo.value)
    assert (tmp_path / "peer-mute.log").read_text().strip() == "starting"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("to_file", [False, True])
def test_managed_process_waits_for_a_line_in_memory_or_in_a_file(tmp_path: Path, to_file: bool) -> None:
    script = "import sys, time; print('one'); print('ready on 42', flush=True); time.sleep(30)"
    log = tmp_path / "child.log" if to_file else None
    proc, match = start_server([sys.executable, "-c", script], name="child", ready=r"ready on (\d+)", log_path=log, timeout=10)
    try:
        assert match.group(1) == "42"
        assert proc.lines[:2] == ["one", "ready on 42"]
        assert "one" in proc.output()
        with pytest.raises(NotReady):
            proc.wait_for("one", timeout=0.3, start=2)
    finally:
        assert proc.stop(5) == -signal.SIGTERM
    exited = ManagedProcess([sys.executable, "-c", "print('bye')"], name="short", log_path=log)
    with pytest.raises(ProcessExited):
        exited.wait_for("never", timeout=10)
    exited.stop()


@pytest.mark.timeout(90)
def test_compare_script_prints_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--scenario", "small", "--rounds", "1",
         "--duration", "1", "--warmup", "0.2", "--connections", "2", "--pause", "0", "--quiet",
         "--latency-at", "0.5", "--json", str(out_json)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=80, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "throughput ratio gateway/direct" in proc.stdout
    assert "added by the gateway, p99" in proc.stdout
    assert "throughput >= 0.45 of direct" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["summary"]["throughput_ratio_median"] > 0


@pytest.mark.timeout(120)
def test_compare_script_runs_peers_in_the_same_rounds(tmp_path: Path) -> None:
    # The plumbing of --peer litellm without installing LiteLLM: a built-in peer (the
    # bare relay) and a command of one's own (a second fake provider) in the same table.
    out_json = tmp_path / "compare.json"
    proc = _script(
        "bench/compare.py", "--scenario", "unpaced", "--tokens", "10", "--rounds", "2", "--duration", "0.5",
        "--warmup", "0", "--connections", "2", "--pause", "0", "--quiet", "--no-otlp",
        "--peer", "floor",
        "--peer-command", "{python} {repo}/fakes/provider.py --port {port}", "--peer-name", "fake2",
        "--peer-kind", "openai", "--peer-ready", "fake provider listening on",
        "--json", str(out_json), timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("gateway", "floor", "fake2"):
        assert f"throughput ratio {name}/direct" in proc.stdout
        assert f"tokens/s ratio {name}/direct" in proc.stdout
    assert "added by floor, p99" in proc.stdout
    assert "round 2: fake2 RSS" in proc.stdout
    data = json.loads(out_json.read_text())
    sides = data["summary"]["sides"]
    assert set(sides) == {"gateway", "floor", "fake2"}
    assert all(side["throughput_ratio_median"] > 0 and side["errors"] == 0 for side in sides.values()), sides
    # Every side ran in every round, and the order rotated.
    assert [set(r) for r in data["rounds"]] == [{"direct", "gateway", "floor", "fake2"}] * 2
    assert proc.stderr.index("round 1/2: direct") < proc.stderr.index("round 1/2: fake2")
    assert proc.stderr.index("round 2/2: gateway") < proc.stderr.index("round 2/2: direct")


@pytest.mark.timeout(60)
def test_floor_script_measures_the_bare_relay() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "floor.py"), "--scenario", "small", "--rounds", "1",
         "--duration", "1", "--connections", "2", "--quiet"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=50, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ratio = float(proc.stdout.split("throughput ratio relay/direct: ")[1].split()[0])
    cpu = float(proc.stdout.split("relay CPU per request: ")[1].split()[0])
    assert ratio > 0 and cpu > 0


class _Transport:
    """Collects what the protocol writes; the responses below are fed by hand."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


@pytest.mark.timeout(10)
@pytest.mark.parametrize("split", [1, 2, 3, 7, 64])
def test_chunked_sse_parsing_with_any_packet_boundaries(split: int) -> None:
    import asyncio

    events = b"".join(
        b"event: content_block_delta\ndata: {\"i\": %d}\n\n" % i for i in range(4)
    ) + b"event: message_stop\ndata: {}\n\n"
    body = b""
    for i in range(0, len(events), 10):
        piece = events[i : i + 10]
        body += b"%x\r\n%s\r\n" % (len(piece), piece)
    body += b"0\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    async def scenario() -> Stats:
        stats = Stats()
        target = Target("127.0.0.1", 1, b"GET / HTTP/1.1\r\n\r\n", stream=True, token_marker=b"event: content_block_delta")
        conn = Connection(target, stats, record=True)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        pending = asyncio.ensure_future(conn.request(0.0, 5.0))
        await asyncio.sleep(0)
        for i in range(0, len(response), split):
            conn.data_received(response[i : i + split])
        await pending
        return stats

    stats = asyncio.run(scenario())
    assert stats.ok == 1
    assert stats.events == 5
    assert stats.tokens == 4
    assert stats.body_bytes == len(events)


def test_procinfo_reads_this_process() -> None:
    sample = procinfo.sample(os.getpid())
    assert sample.rss_bytes > 0 and sample.cpu_s > 0 and os.getpid() in sample.pids


def test_pyspy_summary_parses_raw_output() -> None:
    raw = [
        "thread (1): MainThread;main (gateway.py:10);post (handlers/completions.py:20);loads (json/decoder.py:5) 3",
        "thread (1): MainThread;main (gateway.py:10);post (handlers/completions.py:21) 1",
        "thread (2): OtelBatchSpanRecordProcessor;export (opentelemetry/sdk/x.py:1) 1",
    ]
    prof = pyspy_summary.parse(raw)
    assert prof.total == 5
    assert prof.self_time["loads (json/decoder.py)"] == 3
    assert prof.inclusive["post (handlers/completions.py)"] == 4
    assert prof.threads["OtelBatchSpanRecordProcessor"] == 1
    assert "gateway: handlers" in pyspy_summary.render(prof)


def _script(*args: str, timeout: float = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


@pytest.mark.timeout(90)
def test_soak_script_runs() -> None:
    proc = _script("bench/soak.py", "--minutes", "0.1", "--settle", "0.05", "--every", "1",
                   "--stream-connections", "2", "--small-rate", "5")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RSS growth over the soak" in proc.stdout


@pytest.mark.timeout(90)
def test_ab_script_runs() -> None:
    proc = _script("bench/ab.py", "--a", ".", "--b", ".", "--b-env", "CODY_GATEWAY_TELEMETRY_TRACE_POLICY=none",
                   "--scenario", "small", "--rounds", "1", "--duration", "0.5", "--warmup", "0", "--connections", "2",
                   "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "B/A" in proc.stdout and "CPU ms/req" in proc.stdout


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("py-spy") is None, reason="py-spy is not installed (a development tool)")
def test_profile_script_runs(tmp_path: Path) -> None:
    proc = _script("bench/profile.py", "--scenario", "small", "--duration", "2", "--warmup", "0.5",
                   "--connections", "2", "--out", str(tmp_path))  # fmt: skip
    if proc.returncode != 0 and "Permission denied" in proc.stdout + proc.stderr:
        pytest.skip("py-spy may not attach here (ptrace not permitted)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "summary.txt").read_text().strip()
    assert "top 30 by self time" in proc.stdout
