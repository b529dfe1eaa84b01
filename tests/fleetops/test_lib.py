from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from fleetops.access.models import Organization
from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.cas import cas_update
from fleetops.lib.errors import RaceLost
from fleetops.observability.metrics import RACE_LOST


def test_the_clock_can_be_frozen_and_advanced():
    at = datetime(2030, 1, 1, tzinfo=UTC)
    with clock.frozen(at):
        assert clock.now() == at
        clock.advance(timedelta(seconds=5))
        assert clock.now() == at + timedelta(seconds=5)
    assert clock.now() != at
    with pytest.raises(ValueError):
        clock.frozen(datetime(2030, 1, 1)).__enter__()


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter():
    assert [backoff_delay(n, base=1, cap=30, jitter=False) for n in range(1, 7)] == [1, 2, 4, 8, 16, 30]
    rng = random.Random(7)
    delays = [backoff_delay(4, base=1, cap=30, rng=rng) for _ in range(200)]
    assert all(0 <= d <= 8 for d in delays)
    assert max(delays) > 4 > min(delays)


@pytest.mark.django_db
def test_cas_update_raises_and_counts_a_lost_race():
    org = Organization.objects.create(name="A", slug="a")
    assert cas_update(Organization.objects.filter(pk=org.pk, name="A"), operation="rename", name="B") == 1
    before = RACE_LOST.labels(operation="rename")._value.get()
    with pytest.raises(RaceLost):
        cas_update(Organization.objects.filter(pk=org.pk, name="A"), operation="rename", name="C")
    assert RACE_LOST.labels(operation="rename")._value.get() == before + 1
    org.refresh_from_db()
    assert org.name == "B"
