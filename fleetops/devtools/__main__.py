"""python -m fleetops.devtools demo|test — what ./scripts/demo and ./scripts/test run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fleetops.devtools.services import (
    ROOT,
    VAR,
    broker_url,
    ensure_database,
    say,
    start_embedded_postgres,
    with_database,
    write_dev_env,
)

BIN = Path(sys.executable).parent
# The demo chain produces a block this often (and the demo chain is seeded with the same expected
# block time): fast enough that the smoke test sees the indexed height move within seconds.
CHAIN_BLOCK_INTERVAL = 1.0


def _run(title: str, argv: list[str], env: dict[str, str]) -> None:
    say(title)
    started = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        say(f"FAILED: {title} (exit {result.returncode})")
        raise SystemExit(result.returncode or 1)
    say(f"ok: {title} ({time.monotonic() - started:.1f}s)")


class _Alongside(threading.Thread):
    """A check that runs while pytest does (its output kept and printed once pytest is done)."""

    def __init__(self, title: str, argv: list[str], env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.title, self.argv, self.env = title, argv, env
        self.returncode: int | None = None
        self.output = ""
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            result = subprocess.run(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            self.returncode, self.output = result.returncode, result.stdout
        except OSError as exc:
            self.returncode, self.output = 1, f"{exc}\n"
        self.seconds = time.monotonic() - started

    def report(self) -> bool:
        self.join()
        say(f"{self.title} (ran alongside pytest)")
        print(self.output, end="", flush=True)
        if self.returncode != 0:
            say(f"FAILED: {self.title} (exit {self.returncode}, {self.seconds:.1f}s)")
            return False
        say(f"ok: {self.title} ({self.seconds:.1f}s)")
        return True


def _database(env: dict[str, str], name: str) -> object | None:
    """Point env["DATABASE_URL"] at a database that exists; return the embedded server handle."""
    server = None
    if env.get("DATABASE_URL"):
        say("using DATABASE_URL")
    else:
        server, base = start_embedded_postgres()
        env["DATABASE_URL"] = with_database(base, name)
    ensure_database(env["DATABASE_URL"])
    return server


WORKERS_VARIABLE = "FLEETOPS_TEST_WORKERS"
# The default when FLEETOPS_TEST_WORKERS is unset: one worker per CPU, at most this many (each
# worker has a test database of its own, copied from one migrated once per run).
MAX_DEFAULT_WORKERS = 8


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _xdist_args(pytest_args: list[str]) -> tuple[list[str], str]:
    """pytest-xdist's options for this run and how to say it. FLEETOPS_TEST_WORKERS is a number or
    `auto` (one per CPU; unset: one more than the CPUs); 0 or 1 runs the tests in one process. -n,
    --numprocesses, --dist or -p no:xdist given to the test command win over both."""
    for i, arg in enumerate(pytest_args):
        following = pytest_args[i + 1] if i + 1 < len(pytest_args) else ""
        if arg.startswith(("-n", "--numprocesses", "--dist")) or "no:xdist" in (arg, following):
            return [], "as the arguments say"
    if importlib.util.find_spec("xdist") is None:
        return [], "1 process (pytest-xdist is not installed)"
    value = os.environ.get(WORKERS_VARIABLE, "").strip().lower()
    if not value:
        # One more than the CPUs: a good part of the suite waits on servers and processes it started.
        workers = min(_cpus() + 1, MAX_DEFAULT_WORKERS)
    elif value == "auto":
        workers = _cpus()
    elif value.isdigit():
        workers = int(value)
    else:
        raise SystemExit(f"{WORKERS_VARIABLE} must be a number of workers or 'auto', not {value!r}")
    if workers <= 1:
        return [], f"1 process ({WORKERS_VARIABLE}={value})" if value else "1 process"
    # loadgroup: tests marked xdist_group("name") all run on one worker, one after the other.
    return ["-n", str(workers), "--dist", "loadgroup"], f"{workers} workers ({WORKERS_VARIABLE} to change)"


CHROMIUM_VARIABLE = "FLEETOPS_CHROMIUM"


def _browser_missing() -> str | None:
    """Why the browser tests (tests/browser) will not run here, or None. They skip themselves (and
    fail under CI=true); this says so once more at the end of the run, where it is seen."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    configured = os.environ.get(CHROMIUM_VARIABLE, "").strip()
    if configured and not os.access(configured, os.X_OK):
        return f"{CHROMIUM_VARIABLE}={configured} is not executable"
    if configured:
        return None
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return None
    return f"no Chromium (install Debian's chromium package or set {CHROMIUM_VARIABLE})"


def cmd_test(pytest_args: list[str]) -> int:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="fleetops.settings.test", PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    _run("ruff check", [str(BIN / "ruff"), "check", "."], env)
    _run("ruff format --check", [str(BIN / "ruff"), "format", "--check", "."], env)
    # mypy loads the settings module but never connects: any syntactically valid URL will do. It
    # takes a CPU for a minute from a cold cache, so it runs while pytest does.
    mypy_env = dict(env)
    mypy_env.setdefault("DATABASE_URL", "postgresql://mypy@localhost/mypy")
    mypy = _Alongside("mypy", [str(BIN / "mypy"), "."], mypy_env)
    mypy.start()
    python = str(BIN / "python")
    try:
        server = _database(env, "fleetops")
        check = ["makemigrations", "--check", "--dry-run", "--settings=fleetops.settings.test"]
        _run("makemigrations --check", [python, "manage.py", *check], env)
    except SystemExit:
        mypy.report()
        raise
    xdist, workers = _xdist_args(pytest_args)
    say(f"pytest: {workers}")
    started = time.monotonic()
    result = subprocess.run([python, "-m", "pytest", *xdist, *pytest_args], cwd=ROOT, env=env, check=False)
    elapsed = time.monotonic() - started
    del server  # the embedded server stops when this process exits
    typed = mypy.report()
    browser = _browser_missing()
    if browser:
        say(f"NOT RUN: the browser tests (tests/browser): {browser}")
    if result.returncode == 5:
        say("FAILED: pytest collected no tests")
        return 1
    if result.returncode != 0:
        say(f"FAILED: pytest (exit {result.returncode}, {elapsed:.1f}s)")
        return result.returncode
    say(f"ok: pytest ({elapsed:.1f}s)")
    return 0 if typed else 1


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cmd_demo(port: int, smoke: bool) -> int:
    if not _port_free(port):
        say(f"port {port} is in use; pass --port N (or stop what is listening there)")
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.dev")
    # The demo has no mail server: notification emails are printed by the worker instead.
    env.setdefault("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
    # Holding the handle keeps the embedded server up until this process exits.
    server = _database(env, "fleetops")  # noqa: F841
    env["CELERY_BROKER_URL"] = broker_url()
    prometheus_dir = VAR / "prometheus"
    shutil.rmtree(prometheus_dir, ignore_errors=True)
    prometheus_dir.mkdir(parents=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prometheus_dir)
    write_dev_env({"DATABASE_URL": env["DATABASE_URL"], "CELERY_BROKER_URL": env["CELERY_BROKER_URL"]})

    python = str(BIN / "python")
    # External systems the portal talks to over HTTP: started first (they need no database), so the
    # set-up below has a fleet to seed and sync from and a chain to seed the indexer against.
    fleet_port = _free_port_near(port + 701)
    fleet_url = f"http://127.0.0.1:{fleet_port}"
    # Candidates start above the ports already chosen, which may not be bound yet.
    chain_port = _free_port_near(fleet_port + 1)
    chain_url = f"http://127.0.0.1:{chain_port}"
    simulators = [
        subprocess.Popen(
            [python, "-m", "simulators.fleet", "--port", str(fleet_port), "--devices", "300", "--seed", "1"],
            cwd=ROOT,
            env=env,
        ),
        subprocess.Popen(
            [
                python,
                "-m",
                "simulators.chain",
                "--port",
                str(chain_port),
                "--seed",
                "1",
                "--block-interval",
                str(CHAIN_BLOCK_INTERVAL),
                # Half of the demo's re-stake broadcasts are refused, so keys visibly go
                # retrying #N and, with 3 attempts, about one in eight ends failed.
                "--broadcast-reject-rate",
                "0.5",
            ],
            cwd=ROOT,
            env=env,
        ),
    ]
    try:
        _wait_http(f"{fleet_url}/control/state")
        _wait_http(f"{chain_url}/status")
        ws_url = f"ws://127.0.0.1:{chain_port}/websocket"
        # One process runs every set-up command (python -m fleetops.devtools.steps), each exactly
        # as `manage.py <command>` would: Django starts once, not nine times.
        steps: list[tuple[str, list[str]]] = [
            ("migrate", ["migrate", "--noinput", "-v", "0"]),
            ("collectstatic", ["collectstatic", "--noinput", "-v", "0"]),
            ("schedules_sync", ["schedules_sync"]),
            ("demo_seed", ["demo_seed"]),
            ("curtailment_demo_seed", ["curtailment_demo_seed", "--gateway-url", fleet_url]),
            ("fleet_sync", ["fleet_sync", "--org", "demo"]),
            (
                "indexer_demo_seed",
                [
                    "indexer_demo_seed",
                    "--rpc-url",
                    chain_url,
                    "--ws-url",
                    ws_url,
                    "--block-time",
                    str(CHAIN_BLOCK_INTERVAL),
                ],
            ),
            ("keys_demo_seed", ["keys_demo_seed", "--rpc-url", chain_url]),
            # Registered and classified, so an admin can start the history migration from the
            # console or with `manage.py protocol_migrate history --protocol-id SEP50 SEP41`.
            ("protocol_setup", ["protocol_setup", "--protocol-id", "SEP41", "SEP50", "--chain", "sim"]),
        ]
        _run("set-up", [python, "-m", "fleetops.devtools.steps", json.dumps(steps)], env)
        indexer_port = _free_port_near(chain_port + 1)
        return _supervise(env, port, smoke, fleet_url, chain_url, indexer_port)
    finally:
        for proc in simulators:
            proc.terminate()
            proc.wait(10)


def _free_port_near(preferred: int) -> int:
    for candidate in range(preferred, preferred + 50):
        if _port_free(candidate):
            return candidate
    raise SystemExit("no free port for the simulators")


def _wait_http(url: str, timeout: float = 20) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {timeout:.0f}s")
            time.sleep(0.2)


def demo_processes(port: int, indexer_port: int) -> dict[str, list[str]]:
    """The demo's processes, as the supervisor starts them (each in a process group of its own,
    which it stops with one SIGTERM to the group)."""
    return {
        "web": [
            str(BIN / "gunicorn"),
            "fleetops.wsgi",
            "--config",
            str(ROOT / "deploy" / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
            # Fewer than a web node's 2 x cores + 1 (deploy/gunicorn.conf.py): the demo shares the
            # machine with its worker, beat, indexer and simulators.
            "--workers",
            "2",
        ],
        "worker": [
            str(BIN / "celery"),
            "-A",
            "fleetops",
            "worker",
            "--loglevel",
            "INFO",
            # Threads, not prefork: the supervisor's SIGTERM goes to the whole process group, and
            # prefork children killed that way are logged as "exited with signal 15" errors; one
            # process with a thread pool stops with a quiet warm shutdown.
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--hostname",
            "demo@%h",
            "--without-mingle",
            "--without-gossip",
        ],
        "beat": [
            str(BIN / "celery"),
            "-A",
            "fleetops",
            "beat",
            "--loglevel",
            "INFO",
            "--pidfile",
            str(VAR / "beat.pid"),
        ],
        # The demo chain's single writer; its own port serves /health/live, /health/ready, /metrics.
        "indexer": [
            str(BIN / "python"),
            "manage.py",
            "indexer_run",
            "--chain",
            "sim",
            "--health-port",
            str(indexer_port),
        ],
    }


def _supervise(
    env: dict[str, str], port: int, smoke: bool, fleet_url: str, chain_url: str, indexer_port: int
) -> int:
    from honcho.manager import Manager

    manager = Manager()
    processes = demo_processes(port, indexer_port)
    for name, argv in processes.items():
        manager.add_process(name, shlex.join(argv), env=env, cwd=str(ROOT))

    base = f"http://127.0.0.1:{port}"
    say("FleetOps demo is starting. Ctrl-C stops everything.")
    for label, path in (
        ("console (admin)", "/admin/"),
        ("API docs", "/api/docs/"),
        ("system status", "/ops/status"),
        ("metrics", "/metrics"),
        ("readiness", "/health/ready"),
    ):
        print(f"    {label:<16} {base}{path}", flush=True)
    print(f"    {'fleet simulator':<16} {fleet_url}/control/state", flush=True)
    indexer_base = f"http://127.0.0.1:{indexer_port}"
    for label, url in (
        ("chain status", f"{base}/api/v1/indexer/chains/sim/status"),
        ("indexer health", f"{indexer_base}/health/ready"),
        ("indexer metrics", f"{indexer_base}/metrics"),
        ("chain simulator", f"{chain_url}/control/state"),
    ):
        print(f"    {label:<16} {url}", flush=True)

    outcome: dict[str, bool] = {}
    if smoke:
        from fleetops.devtools.smoke import run_smoke

        def _smoke() -> None:
            outcome["ok"] = run_smoke(base, indexer=indexer_base)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=_smoke, daemon=True).start()

    manager.loop()
    if smoke:
        ok = outcome.get("ok", False)
        say(f"smoke test {'passed' if ok else 'FAILED'}")
        return 0 if ok else 1
    return 0 if manager.returncode in (None, 0, 130, 143, -15, -2) else int(manager.returncode)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetops.devtools")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the portal with web, worker, beat and the indexer")
    demo.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")))
    demo.add_argument("--smoke", action="store_true", help="start, check every entry point, stop")
    test = sub.add_parser("test", help="lint, type-check, migrations check, pytest")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args, extra = parser.parse_known_args()
    if args.command == "demo":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return cmd_demo(args.port, args.smoke)
    # Everything after `test` goes to pytest, options included (-k, -x, -p ...).
    return cmd_test([*extra, *args.pytest_args])


if __name__ == "__main__":
    sys.exit(main())
