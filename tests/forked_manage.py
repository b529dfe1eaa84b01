"""`manage.py` as real processes without an interpreter start and a Django set-up each.

`python -m tests.forked_manage` sets Django up once (the settings of its DJANGO_SETTINGS_MODULE) and
then reads one JSON request per line on stdin: `{"argv": [...], "stdout": path, "stderr": path}`.
For each it forks a child that runs `manage.py` as `python manage.py <argv>` would (stdin at
/dev/null, stdout and stderr into the files named), and answers `{"code": <exit status>}` once the
child has exited. The parent never opens a database connection, so no child shares one.

`ForkedManage` is the test side: one server per settings module, requests one at a time.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]


def _child(request: dict[str, Any]) -> int:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    # Fresh stream objects: the parent's stdin buffer holds requests, not the child's input.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the child
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    sys.argv = ["manage.py", *request["argv"]]
    code = 0
    try:
        runpy.run_path(str(ROOT / "manage.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    import django

    django.setup()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends in os._exit
            code = 1
            try:
                code = _child(request)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkedManage:
    """A `python -m tests.forked_manage` server for one environment; `run` is `subprocess.run`'s
    answer for `python manage.py <argv>` with stdin at /dev/null and the output captured."""

    def __init__(self, env: dict[str, str]) -> None:
        self._lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="forked-manage-")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forked_manage"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._count = 0

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        with self._lock:
            self._count += 1
            out, err = (Path(self._dir.name) / f"{self._count}.{s}" for s in ("out", "err"))
            stdin, stdout = self._pipes()
            stdin.write(json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n")
            stdin.flush()
            reply = _read_line(stdout, timeout)
            code = int(json.loads(reply)["code"])
            return subprocess.CompletedProcess(["manage.py", *argv], code, out.read_text(), err.read_text())

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        return self._proc.stdin, self._proc.stdout

    def close(self) -> None:
        stdin, _ = self._pipes()
        stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._dir.cleanup()


def _read_line(stream: IO[str], timeout: float) -> str:
    """One line from `stream`, or TimeoutError after `timeout` seconds."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got or not got[0]:
        raise TimeoutError(f"no answer from the forked manage.py within {timeout}s")
    return got[0]


if __name__ == "__main__":
    serve()
