"""The real brokers work end to end: a Celery worker and beat (DatabaseScheduler) run as processes on
Redis, on RabbitMQ and on the demo's embedded filesystem broker, and the platform's worker heartbeat
makes the whole trip (beat -> broker -> worker -> a row in PostgreSQL), as does a `.delay()` from
another process (what a web request does). Each broker is the test's own: Redis database 13 (another one
per xdist worker; or a redis-server the test starts), a fresh RabbitMQ virtual host, a filesystem
queue under tmp_path.
Nothing here waits on log text: only on database rows."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.cache.backends.redis import RedisCache
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from fleetops.observability.models import Heartbeat
from fleetops.settings.env import env_cache
from tests.processes import ROOT, subprocess_env
from tests.servers import free_port, rabbitmq_vhost, redis_server, wait_for

pytestmark = pytest.mark.slow

HEARTBEAT_TASK = "fleetops.observability.tasks.worker_heartbeat"
DELAY = "from fleetops.observability.tasks import worker_heartbeat; worker_heartbeat.delay()"


@contextlib.contextmanager
def broker(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "redis":
        with redis_server() as url:
            yield url
    elif kind == "rabbitmq":
        with rabbitmq_vhost(f"fleetops_test_{uuid.uuid4().hex[:8]}") as url:
            yield url
    else:
        # FLEETOPS_VAR_DIR=tmp_path puts the queue folder under tmp_path, away from the demo's.
        yield "filesystem://"


@contextlib.contextmanager
def celery_processes(env: dict[str, str], logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    commands = {
        "worker": [
            "worker",
            "--pool",
            "solo",
            "--loglevel",
            "INFO",
            "--hostname",
            f"brokertest-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        "beat": ["beat", "--loglevel", "INFO", "--schedule", str(logs / "beat-schedule")],
    }
    procs = []
    try:
        for name, args in commands.items():
            out = (logs / f"{name}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "fleetops", *args],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _logs(logs: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log"))
    )


def _beats() -> int:
    row = Heartbeat.objects.filter(name="platform.worker").first()
    return row.beats if row else 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "embedded"])
def test_beat_and_a_web_delay_reach_the_worker_through_the_broker(kind, tmp_path):
    every_second = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="platform.worker_heartbeat", task=HEARTBEAT_TASK, interval=every_second)
    logs = tmp_path / "logs"
    logs.mkdir()
    with broker(kind, tmp_path) as url:
        env = subprocess_env(
            application_name=f"test-brokers-{kind}",
            CELERY_BROKER_URL=url,
            FLEETOPS_VAR_DIR=str(tmp_path),
            LOG_LEVEL="INFO",
        )
        with celery_processes(env, logs) as procs:
            try:
                # beat -> broker -> worker -> database, twice (the schedule keeps firing).
                wait_for(lambda: _beats() >= 2, timeout=90, what=f"two worker heartbeats through {kind}")
                # Stop beat: from now on only the direct publish below can move the heartbeat.
                PeriodicTask.objects.filter(name="platform.worker_heartbeat").update(enabled=False)
                procs[1].terminate()
                procs[1].wait(20)
                before = _beats()
                # What a web request does: `.delay()` from another process with the same settings.
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
                wait_for(lambda: _beats() > before, timeout=60, what=f"the delayed task through {kind}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{_logs(logs)}") from None
            assert procs[0].poll() is None, _logs(logs)


def test_a_redis_cache_url_gives_a_working_redis_cache():
    with redis_server() as url:
        config = env_cache(environ={"CACHE_URL": url})
        assert config["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
        cache = RedisCache(config["LOCATION"], {})
        key = f"fleetops-test-{uuid.uuid4().hex}"
        cache.set(key, {"n": 1}, timeout=30)
        assert cache.get(key) == {"n": 1}
        cache.delete(key)


@pytest.mark.django_db
def test_api_rate_limits_fail_open_while_the_redis_cache_is_down(admin_member, settings):
    closed = f"redis://127.0.0.1:{free_port()}/13"  # nothing listens there
    settings.CACHES = {"default": env_cache(environ={"CACHE_URL": closed})}
    response = admin_member.token_client().get("/api/v1/me/")
    assert response.status_code == 200
