"""The operator files: alert rules (promtool, when installed) and the Grafana dashboard,
checked against the metrics a real gateway exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN_A, actor
from tests.support.observed_fixtures import observed_gateway  # noqa: F401  (fixture)
from tests.support.observed_gateway import InProcessGateway

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "conf" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "conf" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "conf" / "grafana" / "gateway-dashboard.json"
PROMTOOL = shutil.which("promtool")
METRIC = re.compile(r"\bcody_gateway_[a-z0-9_]+")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def exposed_series_names(observed_gateway: Callable[..., InProcessGateway]) -> set[str]:
    gw = observed_gateway([actor("actor-a", TOKEN_A)])
    text = httpx.get(gw.base_url + "/metrics", timeout=10).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_alerts_and_dashboard_only_use_metrics_the_gateway_exposes(observed_gateway: Callable[..., InProcessGateway]) -> None:
    exposed = exposed_series_names(observed_gateway)
    alerts = set(METRIC.findall(ALERTS.read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = alerts | {name for expr in exprs for name in METRIC.findall(expr)}
    assert len(alerts) >= 8 and len(exprs) >= 20
    assert used - exposed == set()


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cody-gateway" and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
