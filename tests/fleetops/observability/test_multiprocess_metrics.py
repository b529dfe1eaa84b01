"""/metrics under several processes (gunicorn workers, Celery prefork children): counters written by
separate processes are summed by the scrape, and a dead process's files do not break it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

BUMP = """
import django
django.setup()
from fleetops.observability.metrics import CELERY_TASKS
CELERY_TASKS.labels(task="t.multi", state="success").inc({n})
"""

SCRAPE = """
import django
django.setup()
from django.test import Client
from fleetops.observability import registry
registry._collectors.clear()  # this process has no migrated database; only the merge is under test
print(Client().get("/metrics").content.decode())
"""


def _run(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_counters_from_several_processes_are_summed_at_scrape(tmp_path):
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "fleetops.settings.test",
    }
    _run(BUMP.format(n=2), env)
    _run(BUMP.format(n=3), env)
    assert len(list(tmp_path.glob("counter_*.db"))) >= 2  # one file per writer process

    body = _run(SCRAPE, env)

    assert 'fleetops_celery_tasks_total{state="success",task="t.multi"} 5.0' in body
