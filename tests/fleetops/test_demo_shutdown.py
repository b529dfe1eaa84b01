"""The demo's worker stops quietly: its supervisor stops each process with one SIGTERM to the process
group (as `./scripts/demo` does on Ctrl-C); the worker, started exactly as the demo starts it, must
finish with a warm shutdown and no "exited with signal 15" errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fleetops.devtools.__main__ import demo_processes
from fleetops.observability.models import Heartbeat
from tests.processes import ROOT, subprocess_env
from tests.servers import wait_for

pytestmark = pytest.mark.slow

DELAY = "from fleetops.observability.tasks import worker_heartbeat; worker_heartbeat.delay()"


@pytest.mark.django_db(transaction=True)
def test_a_group_sigterm_stops_the_demo_worker_without_errors(tmp_path):
    argv = demo_processes(8000, 8703)["worker"]
    argv = [sys.executable, "-m", "celery", *argv[1:]]  # the same arguments, this interpreter
    env = subprocess_env(
        application_name="test-demo-shutdown",
        CELERY_BROKER_URL="filesystem://",
        FLEETOPS_VAR_DIR=str(tmp_path),
        LOG_LEVEL="INFO",
    )
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            published = subprocess.run(
                [sys.executable, "manage.py", "shell", "-c", DELAY],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert published.returncode == 0, published.stderr
            # The worker is up and working: it ran the task and wrote the heartbeat.
            wait_for(
                lambda: Heartbeat.objects.filter(name="platform.worker").exists(),
                timeout=90,
                what="the worker's heartbeat",
            )
            os.killpg(worker.pid, signal.SIGTERM)
            code = worker.wait(60)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
    output = log.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert "exited with" not in output, output[-3000:]
    assert "ERROR" not in output, output[-3000:]
