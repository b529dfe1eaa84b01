from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from fleetops.settings.env import (
    broker_ssl_options,
    env_bool,
    env_broker_url,
    env_cache,
    env_database,
    env_int,
    env_list,
    env_rate,
    env_str,
)

ROOT = Path(__file__).resolve().parents[2]


def test_missing_required_variables_fail_with_their_name():
    with pytest.raises(ImproperlyConfigured, match="SECRET_KEY"):
        env_str("SECRET_KEY", environ={})


@pytest.mark.parametrize("value", ["maybe", "2", "ja"])
def test_a_misspelt_boolean_fails_loudly(value):
    with pytest.raises(ImproperlyConfigured, match="FLAG"):
        env_bool("FLAG", False, environ={"FLAG": value})


def test_booleans_integers_and_lists_parse():
    assert env_bool("F", environ={"F": "Yes"}) is True
    assert env_bool("F", True, environ={"F": "off"}) is False
    assert env_int("N", environ={"N": " 42 "}) == 42
    assert env_list("L", environ={"L": "a, b,,c"}) == ["a", "b", "c"]
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        env_int("N", environ={"N": "4x"})
    with pytest.raises(ImproperlyConfigured, match="below the minimum"):
        env_int("N", min_value=5, environ={"N": "1"})


@pytest.mark.parametrize("value", ["20", "20/fortnight", "0/min", "x/min", "20 per min"])
def test_a_malformed_throttle_rate_fails_loudly(value):
    assert env_rate("RATE", environ={"RATE": " 20/min "}) == "20/min"
    with pytest.raises(ImproperlyConfigured, match="RATE"):
        env_rate("RATE", environ={"RATE": value})


def test_only_postgresql_urls_are_accepted():
    cfg = env_database(environ={"DATABASE_URL": "postgresql://u:p@db:5433/fleet"})
    assert (cfg["HOST"], cfg["PORT"], cfg["NAME"]) == ("db", 5433, "fleet")
    with pytest.raises(ImproperlyConfigured, match="PostgreSQL"):
        env_database(environ={"DATABASE_URL": "sqlite:///x.db"})
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL"):
        env_database(environ={})


def _production_check(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "fleetops.settings.production",
        "SECRET_KEY": "x" * 20 + "production-check-only-" + "y" * 30,
        "ALLOWED_HOSTS": "fleetops.example.com",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        **extra,
    }
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_passes_with_production_settings():
    result = _production_check({})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    result = _production_check({"SECRET_KEY": ""})
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:secret@redis.internal:6380/0",
        "amqp://guest:guest@127.0.0.1:5672/fleetops",
        "amqps://user:pass@mq.internal:5671/",
        "filesystem://",
        "memory://",
    ],
)
def test_the_supported_brokers_are_accepted(url):
    assert env_broker_url(environ={"CELERY_BROKER_URL": url}) == url


@pytest.mark.parametrize("url", ["sqs://", "redis:/127.0.0.1", "localhost:6379", "kafka://broker:9092"])
def test_any_other_broker_url_stops_the_process_with_its_name(url):
    with pytest.raises(ImproperlyConfigured, match="CELERY_BROKER_URL must be a broker URL"):
        env_broker_url(environ={"CELERY_BROKER_URL": url})


@pytest.mark.parametrize("url", ["filesystem://", "memory://"])
def test_production_refuses_the_single_machine_brokers(url):
    result = _production_check({"CELERY_BROKER_URL": url})
    assert result.returncode != 0
    assert "CELERY_BROKER_URL must be a broker URL" in result.stderr


def test_a_tls_redis_broker_verifies_the_certificate_unless_the_url_says_otherwise():
    assert broker_ssl_options("rediss://redis.internal:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl_options("rediss://redis.internal:6380/0?ssl_cert_reqs=optional") is None
    assert broker_ssl_options("redis://127.0.0.1:6379/0") is None


def test_the_cache_is_redis_for_a_redis_url_the_database_otherwise_and_nothing_else():
    assert env_cache(environ={"CACHE_URL": "redis://r:6379/1"}) == {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://r:6379/1",
    }
    assert env_cache(environ={"CACHE_URL": "rediss://r:6380/1"})["LOCATION"] == "rediss://r:6380/1"
    assert env_cache(environ={})["BACKEND"] == "django.core.cache.backends.db.DatabaseCache"
    with pytest.raises(ImproperlyConfigured, match="CACHE_URL"):
        env_cache(environ={"CACHE_URL": "memcached://m:11211"})


def test_a_database_connect_gives_up_after_ten_seconds_unless_the_url_says_otherwise():
    assert env_database(environ={"DATABASE_URL": "postgresql://u@db/f"})["OPTIONS"]["connect_timeout"] == 10
    slow = env_database(environ={"DATABASE_URL": "postgresql://u@db/f?connect_timeout=30"})
    assert int(slow["OPTIONS"]["connect_timeout"]) == 30
