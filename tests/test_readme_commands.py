"""The README's demo command works from a fresh copy of the repository, with the embedded
PostgreSQL and broker, and again (idempotently) against DATABASE_URL when the suite has one.

The copy shares this checkout's .venv (a link): both README commands begin with the same
scripts/bootstrap, and creating .venv from nothing is what CI's fresh clone does before it runs the
test command, so the install is proven there, every run, and not paid for twice."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _fresh_copy(dest: Path) -> None:
    """What `git clone` of this tree would hold: tracked files plus new, not-ignored ones."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PROMETHEUS_", "PYTEST_"))}
    for key in ("DATABASE_URL", "CELERY_BROKER_URL", "VIRTUAL_ENV", "FLEETOPS_VAR_DIR"):
        env.pop(key, None)
    venv_bin = str(ROOT / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


def _demo(clone: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["./scripts/demo", "--smoke", "--port", str(_free_port())],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )


def test_the_demo_command_runs_from_a_fresh_copy(tmp_path):
    clone = tmp_path / "fleetops"
    _fresh_copy(clone)
    venv = ROOT / ".venv"
    assert (venv / "bin" / "python").exists(), "run scripts/bootstrap (or the test command) first"
    (clone / ".venv").symlink_to(venv, target_is_directory=True)

    embedded = _demo(clone, _clean_env())
    output = embedded.stdout + embedded.stderr
    assert embedded.returncode == 0, output[-6000:]
    assert "installing dependencies" not in output  # the copy runs on the bootstrapped .venv
    assert "embedded PostgreSQL ready" in output
    assert "smoke test passed" in output
    assert "demo-admin" in output and "password:" in output
    assert "FAIL" not in output.replace("FAILED", "")

    if not os.environ.get("DATABASE_URL"):
        return
    from fleetops.devtools.services import drop_database, with_database

    url = with_database(os.environ["DATABASE_URL"], f"fleetops_smoke_{uuid.uuid4().hex[:8]}")
    try:
        external = _demo(clone, _clean_env(DATABASE_URL=url))
        output = external.stdout + external.stderr
        assert external.returncode == 0, output[-6000:]
        assert "using DATABASE_URL" in output and "smoke test passed" in output
        assert "installing dependencies" not in output
    finally:
        drop_database(url)
