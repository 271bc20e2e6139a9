"""
The Grafana dashboard and the Prometheus alerting rules in contrib/: every
metric and label they name exists on a running instance's /metrics, they
cover what an operator watches, and the rules pass Debian's promtool (check
and unit tests).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .conftest import TIMEOUT, missing_tool

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
DASHBOARD = CONTRIB / "grafana" / "notifyd-dashboard.json"
ALERTS = CONTRIB / "prometheus" / "notifyd-alerts.yml"
ALERT_TESTS = CONTRIB / "prometheus" / "notifyd-alerts.test.yml"

_METRIC = re.compile(r"\bnotifyd_[a-z0-9_]+\b")
_BY = re.compile(r"\bby \(([^)]*)\)")
_TEMPLATE_LABEL = re.compile(r"\{\{\s*\$?(?:labels\.)?([a-z_]+)\s*\}\}")
# Labels Prometheus adds at scrape time, and the histogram's own.
_SCRAPE_LABELS = {"instance", "job", "le"}


def _dashboard_expressions() -> list[str]:
    """
    Every PromQL text in the dashboard: panel targets and variable queries.
    """
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                elif key == "query" and isinstance(value, dict):
                    found.append(str(value.get("query", "")))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def _legends() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target.get("legendFormat", "")
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


async def _scrape_when_complete(port: int) -> str:
    """
    /metrics once the probe has run (its gauges appear after the first one).
    """

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
            return str(reply.read().decode())

    deadline = time.monotonic() + 3 * TIMEOUT
    while True:
        text = await asyncio.to_thread(get)
        if all(
            name in text
            for name in ("notifyd_probe_age_seconds", "notifyd_pg_notification_queue_usage")
        ):
            return text
        assert time.monotonic() < deadline, f"the probe's gauges never appeared:\n{text}"
        await asyncio.sleep(0.1)


async def test_every_metric_and_label_the_dashboard_and_alerts_name_exists(start_daemon, tmp_path):
    """A running instance (with a sink) exposes every series name and label the contrib files use."""
    daemon = await start_daemon(sinks=["log"], log_sink_path=str(tmp_path / "sink.log"))
    # Rejected authentications are labelled by reason, so the family has
    # samples only once one happened.
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://127.0.0.1:{daemon.port}/ws/message?token=not.a.jwt"):
            pass
    text = await _scrape_when_complete(daemon.port)
    samples = {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    labels = set().union(*samples.values()) | _SCRAPE_LABELS

    expressions = _dashboard_expressions()
    dashboard_names = {name for expr in expressions for name in _METRIC.findall(expr)}
    alert_text = ALERTS.read_text()
    alert_names = set(_METRIC.findall(alert_text))
    missing = sorted((dashboard_names | alert_names) - set(samples))
    assert not missing, f"named in contrib/ but not on /metrics: {missing}"

    used_labels = {
        label.strip()
        for text_ in [*expressions, alert_text]
        for group in _BY.findall(text_)
        for label in group.split(",")
        if label.strip()
    }
    used_labels |= {label for legend in _legends() for label in _TEMPLATE_LABEL.findall(legend)}
    used_labels |= set(_TEMPLATE_LABEL.findall(alert_text))
    assert used_labels, "no label found: the extraction is broken"
    assert used_labels <= labels | {"value"}, sorted(used_labels - labels)

    # What an operator watches is all there.
    for name in (
        "notifyd_sessions",
        "notifyd_users_online",
        "notifyd_messages_delivered_total",
        "notifyd_delivery_latency_seconds_bucket",
        "notifyd_gap_repair_rows_total",
        "notifyd_slow_client_closes_total",
        "notifyd_limit_trips_total",
        "notifyd_listen_connected",
        "notifyd_ready",
        "notifyd_sink_queue_depth",
        "notifyd_sink_failed_total",
    ):
        assert name in dashboard_names, name
    assert any("histogram_quantile(0.99" in expr for expr in expressions)
    assert any("histogram_quantile(0.5" in expr for expr in expressions)
    alerts = set(re.findall(r"- alert: (\w+)", alert_text))
    assert {
        "NotifydNotReady",
        "NotifydWatchdogStarved",
        "NotifydDeliveryLatencyHigh",
        "NotifydGapRepairs",
        "NotifydSinkFailing",
        "NotifydListenerFlapping",
    } <= alerts, alerts


def test_dashboard_panels_are_well_formed_for_grafana():
    """Unique panel ids, a data source and a refId on every query, panels within the 24-column grid."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    # No two panels share a cell of the grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_tool("promtool is not installed: apt-get install prometheus")
    return found


def test_alert_rules_pass_promtool_check():
    """`promtool check rules` accepts the rules file."""
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=6 * TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_each_alert_fires_on_its_series_in_promtool_unit_tests():
    """`promtool test rules`: each alert fires (with its text) on the series that should raise it, and not on a healthy instance."""
    result = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=6 * TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested == set(re.findall(r"- alert: (\w+)", ALERTS.read_text())), tested
