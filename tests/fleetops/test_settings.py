from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from fleetops.settings.env import env_bool, env_database, env_int, env_list, env_str

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
