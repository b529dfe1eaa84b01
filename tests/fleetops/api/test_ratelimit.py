"""The API's rate-limit counters: one statement in PostgreSQL (the embedded default) or one Redis
round trip, exact across connections, refusing past the rate until the window ends."""

from __future__ import annotations

import copy
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from fleetops.api import ratelimit
from fleetops.api.models import RateCounter
from fleetops.lib import clock
from fleetops.settings.env import env_cache

ME = "/api/v1/me/"
# 12:00:10 in a window of a minute: 50 s until it ends.
T0 = datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC)
REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
def three_per_minute(settings):
    rest = copy.deepcopy(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"]["user"] = "3/min"
    settings.REST_FRAMEWORK = rest


@pytest.fixture(params=["postgresql", "redis"])
def store(request, settings):
    if request.param == "redis":
        settings.CACHES = {"default": _redis_cache()}
    return request.param


def _redis_cache() -> dict[str, object]:
    # A prefix of its own, so counters left by an earlier run (same user ids, same frozen window)
    # are not counted again.
    return {**env_cache(environ={"CACHE_URL": REDIS_URL}), "KEY_PREFIX": uuid.uuid4().hex}


@pytest.mark.django_db
def test_the_fourth_request_in_a_window_is_a_429_until_the_window_ends(viewer, three_per_minute, store):
    client = viewer.token_client()
    with clock.frozen(T0):
        assert [client.get(ME).status_code for _ in range(3)] == [200, 200, 200]
        refused = client.get(ME)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "throttled"
        assert refused["Retry-After"] == "51"
        clock.advance(timedelta(seconds=50))
        assert client.get(ME).status_code == 200


@pytest.mark.django_db
def test_each_user_has_a_counter_of_their_own(viewer, operator, three_per_minute, store):
    mine, theirs = viewer.token_client(), operator.token_client()
    with clock.frozen(T0):
        for _ in range(3):
            assert mine.get(ME).status_code == 200
        assert mine.get(ME).status_code == 429
        assert theirs.get(ME).status_code == 200


@pytest.mark.django_db
def test_a_request_is_counted_by_one_upsert_in_postgresql(viewer):
    client = viewer.token_client()
    client.get(ME)
    with CaptureQueriesContext(connection) as captured:
        client.get(ME)
    counters = [q["sql"] for q in captured.captured_queries if ratelimit.TABLE in q["sql"]]
    # The user's count, and the address's failed-token count inside the token's own query.
    assert len(counters) == 2
    assert counters[1].startswith(f"INSERT INTO {ratelimit.TABLE}")
    assert "access_apitoken" in counters[0]


@pytest.mark.django_db
def test_counters_in_redis_leave_the_database_alone(viewer, settings):
    settings.CACHES = {"default": _redis_cache()}
    client = viewer.token_client()
    client.get(ME)
    with CaptureQueriesContext(connection) as captured:
        assert client.get(ME).status_code == 200
    assert not [q for q in captured.captured_queries if ratelimit.TABLE in q["sql"]]
    assert not RateCounter.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_hits_on_separate_connections_lose_no_count():
    rate = ratelimit.Rate.parse("1000/min")
    counts: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            for _ in range(25):
                count = ratelimit.hit("user:race", rate)
                with lock:
                    counts.append(count.hits)
        finally:
            connections.close_all()

    with clock.frozen(T0):
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ratelimit.peek("user:race", rate).hits == 100
    # Every request saw a count of its own: none was lost or counted twice.
    assert sorted(counts) == list(range(1, 101))


@pytest.mark.django_db
def test_a_new_window_starts_again_at_one_and_old_rows_are_pruned():
    rate = ratelimit.Rate.parse("2/min")
    with clock.frozen(T0):
        assert [ratelimit.hit("anon:192.0.2.1", rate).hits for _ in range(3)] == [1, 2, 3]
        clock.advance(timedelta(minutes=1))
        assert ratelimit.hit("anon:192.0.2.1", rate).hits == 1
        clock.advance(timedelta(days=2))
        assert ratelimit.prune() == 1
    assert not RateCounter.objects.exists()


@pytest.mark.parametrize(
    ("text", "limit", "seconds"),
    [("20/min", 20, 60), ("5/s", 5, 1), ("100/hour", 100, 3600), ("7/day", 7, 86400)],
)
def test_rates_parse_as_drf_writes_them(text, limit, seconds):
    assert ratelimit.Rate.parse(text) == ratelimit.Rate(limit, seconds)
