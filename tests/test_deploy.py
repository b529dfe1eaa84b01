"""Alert rules and dashboards parse, and every metric they name is one the portal exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
METRIC = re.compile(r"\b((?:fleetops|django)_[a-z0-9_]+)\b")
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


@pytest.fixture
def exported(client, db) -> set[str]:
    body = client.get("/metrics").content.decode()
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            names |= {family + s for s in SUFFIXES} | {family.removesuffix("_total")}
    return names


def _anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces -> '-'."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in markdown.read_text().splitlines()
        if line.startswith("#")
    }


def _rule_files() -> list[Path]:
    return sorted((ROOT / "deploy" / "prometheus").glob("*.rules.yml"))


def _dashboards() -> list[Path]:
    return sorted((ROOT / "deploy" / "grafana").glob("*.json"))


def test_there_are_rules_and_dashboards():
    assert _rule_files()
    assert _dashboards()


@pytest.mark.parametrize("path", _rule_files(), ids=lambda p: p.name)
def test_alert_rules_parse_and_name_only_exported_metrics(path, exported):
    doc = yaml.safe_load(path.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        assert rule["alert"] and rule["expr"]
        assert rule["labels"]["severity"] in {"page", "warn", "info"}
        assert rule["annotations"]["summary"]
        runbook, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / runbook).exists(), f"{rule['alert']}: runbook {runbook} missing"
        if anchor:
            assert anchor in _anchors(ROOT / runbook), f"{rule['alert']}: no section #{anchor} in {runbook}"
        for metric in METRIC.findall(rule["expr"]):
            assert metric in exported, f"{rule['alert']} names {metric}, which /metrics does not export"


@pytest.mark.parametrize("path", _dashboards(), ids=lambda p: p.name)
def test_dashboards_parse_and_name_only_exported_metrics(path, exported):
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    for expr in exprs:
        for metric in METRIC.findall(expr):
            assert metric in exported, f"{path.name} names {metric}, which /metrics does not export"
