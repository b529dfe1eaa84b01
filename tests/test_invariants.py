"""Rules of the code base checked over the whole tree (DESIGN.md rules 1-3 and 12; STYLE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.core.management import call_command

from fleetops.lib.machine import machines
from fleetops.lib.machines_doc import render
from tests.import_graph import ROOT, cycles, module_name

APPS = ["fleetops", "curtailment", "migrations_app", "indexer"]
KERNEL = ROOT / "fleetops" / "lib" / "transition.py"
MAX_LINES = 600
# A module may pass the cap when its docstring says why.
LONG_REASON = "longer than 600 lines because"


def _sources() -> list[Path]:
    return sorted(
        p
        for app in APPS
        for p in (ROOT / app).rglob("*.py")
        if "migrations" not in p.relative_to(ROOT).parts[1:]
    )


@pytest.mark.parametrize("app", APPS)
def test_no_import_cycle_inside_an_app(app):
    assert cycles(APPS, within=app) == []


def test_fleetops_imports_no_domain_app_and_migrations_app_never_reads_indexer_models():
    from tests.import_graph import graph

    g = graph(APPS)
    leaks = sorted(
        f"{m} -> {t}"
        for m, ts in g.items()
        if m.startswith("fleetops")
        for t in ts
        if t.split(".")[0] != "fleetops"
    )
    assert leaks == []
    reads = sorted(
        f"{m} -> {t}"
        for m, ts in g.items()
        if m.startswith("migrations_app")
        for t in ts
        if t == "indexer.models"
    )
    assert reads == []


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}


def test_no_service_takes_a_role_argument():
    """The role comes from the actor: no function that acts for an actor takes a `role` too, and no
    service module offers a function with a `role` parameter at all. The gates (`require_role` and
    its wrappers, named `require*`) take the role they *demand*, which is the point of them."""
    offenders = []
    for path in _sources():
        name = module_name(path)
        service_module = name.endswith(".services") or ".services." in name
        for fn in _functions(ast.parse(path.read_text())):
            params = _params(fn)
            gate = fn.name.startswith("require")
            if (
                "role" in params
                and not gate
                and ("actor" in params or (service_module and not fn.name.startswith("_")))
            ):
                offenders.append(f"{name}.{fn.name}")
    assert offenders == []


def _state_columns() -> set[str]:
    return {m.field for m in machines()}


class _StateSql:
    """Finds SQL text that assigns a state column in an UPDATE's SET list."""

    SET_LIST = re.compile(r"\bUPDATE\b[^;]*?\bSET\b([\s\S]*?)(?:\bFROM\b|\bWHERE\b|\bRETURNING\b|$)", re.I)

    def __init__(self, columns: set[str]) -> None:
        self.assigns = re.compile(r"(?:^|[\s,.])(" + "|".join(sorted(columns)) + r")\s*=", re.I)

    def search(self, text: str) -> bool:
        return any(self.assigns.search(m.group(1)) for m in self.SET_LIST.finditer(text))


def test_the_state_sql_detector_flags_assignments_only():
    sql = _StateSql({"status", "state"})
    assert sql.search("UPDATE t SET state = %s WHERE id = 1")
    assert sql.search("UPDATE t AS x SET claim_token = %s, status = v.s FROM v WHERE x.id = v.id")
    assert not sql.search("UPDATE t SET claim_token = %s WHERE status = %(pending)s")
    assert not sql.search("INSERT INTO t (status) VALUES (%s)")


def test_state_columns_are_updated_only_by_the_kernel():
    """No `.update(<state column>=...)` and no SQL `SET <state column> =` outside the kernel."""
    columns = _state_columns()
    assert {"state", "status", "mode", "connection_status", "migration_status"} <= columns
    sql = _StateSql(columns)
    offenders = []
    for path in _sources():
        if path == KERNEL:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and any(k.arg in columns for k in node.keywords)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .update()")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} SQL")
            if isinstance(node, ast.JoinedStr):
                text = "".join(
                    v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
                )
                if sql.search(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} SQL")
    assert offenders == []


def test_every_module_stays_under_the_line_cap_or_says_why():
    long = []
    for path in _sources():
        text = path.read_text()
        if (
            text.count("\n") > MAX_LINES
            and LONG_REASON not in (ast.get_docstring(ast.parse(text)) or "").lower()
        ):
            long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long == []


def test_every_machine_is_declared_with_a_check_constraint_on_its_column():
    from django.apps import apps

    declared = {m.name for m in machines()}
    assert {"notifications.delivery"} <= declared
    for m in machines():
        found = False
        for model in apps.get_models():
            for constraint in model._meta.constraints:
                condition = getattr(constraint, "condition", None)
                if condition is not None and condition == m.constraint_q():
                    found = True
        assert found, f"{m.name}: no CheckConstraint built from constraint_q()"


def test_the_state_machine_page_in_docs_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "state-machines.md").read_text() == render()
    call_command("machines_doc", "--check")
