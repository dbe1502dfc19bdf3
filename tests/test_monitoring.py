"""The shipped Prometheus config and alerts are valid, and the dashboard and alerts ask only for series coMind
exports."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from comind.metrics import PsMetrics, WorkerMetrics
from processes import ROOT

MONITORING = ROOT / "monitoring"


def exported_series() -> set[str]:
    registry = CollectorRegistry()
    PsMetrics(registry)
    WorkerMetrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_promtool_accepts_the_shipped_config():
    if not shutil.which("promtool"):
        pytest.fail("promtool is missing: ./scripts/setup --for-tests installs it")
    result = subprocess.run(["promtool", "check", "config", MONITORING / "prometheus.yml"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_series_the_dashboard_queries_is_exported():
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "comind.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bcomind_[a-z_]+", target["expr"])}
    assert queried, "the dashboard queries no coMind series"
    assert queried <= exported_series(), queried - exported_series()
    # Every core series of docs/design.md, decision 8 (README.md lists them) is on the dashboard.
    for core in ("comind_round", "comind_round_duration_seconds_bucket", "comind_train_loss", "comind_eval_accuracy",
                 "comind_workers", "comind_updates_total", "comind_update_bytes_total"):
        assert core in queried


def promtool(*args: object) -> None:
    if not shutil.which("promtool"):
        pytest.fail("promtool is missing: ./scripts/setup --for-tests installs it")
    result = subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_are_valid_and_pass_their_unit_tests():
    """monitoring/alerts.test.yml: each alert fires on its trouble, and not before, nor once training is done."""
    promtool("check", "rules", MONITORING / "alerts.yml")
    promtool("test", "rules", MONITORING / "alerts.test.yml")


def test_the_alerts_ask_only_for_series_coMind_exports_and_the_chart_ships_the_same():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    queried = {name for rule in rules for name in re.findall(r"\bcomind_[a-z_]+", rule["expr"])}
    assert queried <= exported_series() | recorded, queried - exported_series()
    shipped, copy = MONITORING / "alerts.yml", ROOT / "helm" / "comind" / "files" / "alerts.yml"
    assert copy.read_bytes() == shipped.read_bytes(), f"the chart's copy is stale: cp {shipped} {copy}"
