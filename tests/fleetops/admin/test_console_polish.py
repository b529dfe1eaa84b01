"""Small things an operator meets in the console and the demo: one title per page, a favicon, counts
in the singular when there is one, card headers that do not break inside a word, the indexer's
progress summarized, the demo's ports documented, and a quiet Ctrl-C."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders
from django.core.management.base import OutputWrapper

from curtailment.planning import StartRequest
from curtailment.services import curtailment_start
from fleetops.audit.actors import Actor
from fleetops.devtools.__main__ import demo_processes
from indexer.management.commands.indexer_run import Command as IndexerRun
from indexer.runner import StepResult
from migrations_app.models.keys import Key
from tests.curtailment.conftest import make_fleet
from tests.migrations_app.keys_fixtures import make_keys

ROOT = Path(__file__).resolve().parents[3]


def _h1s(html: str) -> list[str]:
    return re.findall(r"<h1[^>]*>(.*?)</h1>", html, re.S)


@pytest.mark.django_db
def test_custom_pages_show_their_title_once(client, operator):
    make_fleet(operator.org, 3)
    event = curtailment_start(
        org=operator.org, actor=Actor.for_user(operator.user), req=StartRequest(target_kw=3.0, reason="peak")
    ).event
    client.force_login(operator.user)
    for url in (
        "/admin/curtailment/curtailmentevent/start/",
        f"/admin/curtailment/curtailmentevent/{event.pk}/action/stop/",
        f"/admin/curtailment/curtailmentevent/{event.pk}/action/update/",
    ):
        page = client.get(url)
        assert page.status_code == 200, url
        assert len(_h1s(page.content.decode())) == 1, url


@pytest.mark.django_db
def test_every_console_page_links_the_favicon(client, viewer):
    client.force_login(viewer.user)
    for url in ("/admin/", "/admin/audit/auditevent/"):
        html = client.get(url).content.decode()
        assert '<link rel="icon" type="image/svg+xml" href="/static/fleetops/favicon.svg">' in html, url
    icon = finders.find("fleetops/favicon.svg")
    assert icon is not None and Path(icon).read_text().startswith("<svg")


@pytest.mark.django_db
def test_one_selected_key_is_one_key(client, operator):
    key = make_keys(
        operator.org, 1, migration_status="failed", migration_attempts=5, migration_max_attempts=5
    )[0]
    client.force_login(operator.user)
    asked = client.post("/admin/migrations_app/key/", {"action": "retry_keys", "_selected_action": [key.pk]})
    assert "This applies to 1 key " in asked.content.decode()
    done = client.post(
        "/admin/migrations_app/key/",
        {"action": "retry_keys", "_selected_action": [key.pk], "apply": "1", "reason": "fee"},
        follow=True,
    )
    text = done.content.decode()
    assert "1 key changed" in text and "1 keys" not in text
    assert Key.objects.get(pk=key.pk).migration_status == "scheduled"


def test_card_headers_do_not_break_inside_a_word():
    # "PROTOCOL" in a narrow card column broke as "PROTOC OL": the admin's tables allow breaking
    # anywhere; card headers must not.
    css = (ROOT / "fleetops" / "static" / "fleetops" / "console.css").read_text()
    rules = re.findall(r"([^{}]*\.fo-card th\b[^{}]*)\{([^}]*)\}", css)
    assert any("word-break: normal" in body for _, body in rules), rules
    index = (ROOT / "templates" / "admin" / "fleetops_index.html").read_text()
    assert "admin/fleetops/assets.html" in index


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run_steps(command: IndexerRun, steps: list[StepResult], clock: _Clock, tick: float = 1.0) -> list[str]:
    out = io.StringIO()
    command.stdout = OutputWrapper(out)
    total = [0]
    for step in steps:
        clock.now += tick
        command._report(step, 0.0, total)
    return [line for line in out.getvalue().splitlines() if line]


def test_the_indexer_summarizes_progress_instead_of_a_line_per_block(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("indexer.management.commands.indexer_run.time.monotonic", clock)
    block = StepResult(leader=True, committed=1, head=100, indexed=99, mode="normal")
    quiet = IndexerRun()
    lines = _run_steps(quiet, [block] * 29, clock)
    assert len(lines) == 1  # the first step, then nothing until 30 s have passed
    lines = _run_steps(quiet, [block] * 2, clock)
    assert len(lines) == 1 and "+30 blocks" in lines[0]  # every block since the last line
    # A note (a reorg, a halt) is printed at once.
    reorg = StepResult(
        leader=True, committed=0, head=100, indexed=97, mode="normal", note="reorg: rolled back 3"
    )
    said = _run_steps(quiet, [reorg], clock)
    assert len(said) == 1 and said[0].endswith("reorg: rolled back 3")
    verbose = IndexerRun()
    verbose.per_step = True
    assert len(_run_steps(verbose, [block] * 5, clock)) == 5


def test_the_readme_says_the_demo_ports_follow_port():
    readme = (ROOT / "README.md").read_text()
    assert "The ports follow `--port`" in readme
    source = (ROOT / "fleetops" / "devtools" / "__main__.py").read_text()
    # The offsets the README gives are the ones the demo uses.
    assert "_free_port_near(port + 701)" in source and "P+701" in readme
    assert "_free_port_near(fleet_port + 1)" in source and "P+702" in readme
    assert "_free_port_near(chain_port + 1)" in source and "P+703" in readme


def test_the_demo_worker_is_one_process_so_a_group_sigterm_stops_it_quietly():
    worker = demo_processes(8000, 8703)["worker"]
    pool = worker[worker.index("--pool") + 1]
    assert pool in ("threads", "solo")
