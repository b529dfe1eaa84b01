"""Alert rules and dashboards parse, and every metric they name is one the portal exports; systemd
units and the Procfile run commands that exist, and every `--loop` command has both."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from django.core.management import get_commands, load_command_class

from fleetops.observability.commands import TickCommand

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


# --- process files ------------------------------------------------------------------------------


def _units() -> list[Path]:
    return sorted((ROOT / "deploy" / "systemd").glob("*.service"))


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def _procfile() -> dict[str, str]:
    lines = (ROOT / "deploy" / "Procfile").read_text().splitlines()
    entries = [line.split(":", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): command.strip() for name, command in entries}


def _manage_commands(command_line: str) -> list[list[str]]:
    """The argument lists of every `manage.py <command> ...` in a shell command line."""
    found = []
    for part in re.split(r"&&|;", command_line):
        words = shlex.split(part)
        if "manage.py" in words:
            found.append(words[words.index("manage.py") + 1 :])
    return found


def _loop_commands() -> set[str]:
    """Every management command of ours built on TickCommand (the ones with `--loop`)."""
    ours = [(name, app) for name, app in get_commands().items() if app.split(".")[0] in OUR_APPS]
    return {name for name, app in ours if isinstance(load_command_class(app, name), TickCommand)}


OUR_APPS = {"fleetops", "curtailment", "migrations_app", "indexer"}


@pytest.mark.parametrize("path", _units(), ids=lambda p: p.name)
def test_systemd_units_parse_and_run_commands_that_exist(path):
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["User"] == "fleetops"
    assert service["Restart"] == "always"
    assert "EnvironmentFile=/etc/fleetops/env\n" in path.read_text()  # the key may repeat
    exec_start = service["ExecStart"]
    assert exec_start.startswith("/srv/fleetops/.venv/bin/")
    known = get_commands()
    for argv in _manage_commands(exec_start) + _manage_commands(service.get("ExecStartPre", "")):
        assert argv[0] in known, f"{path.name}: manage.py {argv[0]} does not exist"
        # The arguments parse (systemd's %i and ${VAR} stand in for real values here).
        args = [re.sub(r"%i|\$\{\w+\}", "1", a) for a in argv[1:]]
        command = load_command_class(known[argv[0]], argv[0])
        command.create_parser("manage.py", argv[0]).parse_args(args)


def test_procfile_lines_run_commands_that_exist():
    known = get_commands()
    for name, command_line in _procfile().items():
        for argv in _manage_commands(command_line):
            assert argv[0] in known, f"Procfile {name}: manage.py {argv[0]} does not exist"


def test_every_loop_command_has_a_systemd_unit_and_a_procfile_line():
    loops = _loop_commands()
    assert {"curtailment_reconcile", "keys_restake", "keys_verify"} <= loops
    in_units = {
        argv[0]
        for path in _units()
        for argv in _manage_commands(_unit(path)["Service"]["ExecStart"])
        if "--loop" in argv
    }
    in_procfile = {
        argv[0] for line in _procfile().values() for argv in _manage_commands(line) if "--loop" in argv
    }
    assert loops - in_units == set(), "loop commands without a systemd unit"
    assert loops - in_procfile == set(), "loop commands without a Procfile line"
