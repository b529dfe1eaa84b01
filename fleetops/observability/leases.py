"""Leader leases with fencing tokens, in PostgreSQL.

1. `lease_acquire` is one upsert: it takes a free or expired lease (token + 1) or renews our own
   (same token). A live lease held by someone else is left alone and the call returns None.
2. The holder renews well inside the TTL (`lease_renew`, a compare-and-set on holder + token).
3. Every write transaction of the holder calls `lease_assert_held(name, token)`, which locks the
   lease row FOR SHARE: a takeover's UPDATE waits for that commit, and after a takeover the old
   token no longer matches, so a paused ex-leader can never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction

from fleetops.lib import clock
from fleetops.lib.errors import Conflict
from fleetops.observability.metrics import LEASE_EVENTS
from fleetops.observability.models import Lease

LEASE_LOST = "The lease {name} is no longer held with token {token}."

_TABLE = Lease._meta.db_table
_ACQUIRE = f"""
INSERT INTO {_TABLE} AS l (name, holder, token, acquired_at, renewed_at, expires_at)
VALUES (%(name)s, %(holder)s, 1, %(now)s, %(now)s, %(expires)s)
ON CONFLICT (name) DO UPDATE SET
    token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > %(now)s THEN l.token ELSE l.token + 1 END,
    acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > %(now)s
                       THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
    holder = EXCLUDED.holder,
    renewed_at = EXCLUDED.renewed_at,
    expires_at = EXCLUDED.expires_at
WHERE l.holder = EXCLUDED.holder OR l.expires_at <= %(now)s
RETURNING token, acquired_at
"""  # noqa: S608 - table name from the model


class LeaseLost(Conflict):
    code = "lease_lost"


@dataclass(frozen=True)
class LeaseGrant:
    name: str
    holder: str
    token: int
    expires_at: datetime


def lease_acquire(*, name: str, holder: str, ttl: timedelta) -> LeaseGrant | None:
    now = clock.now()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_ACQUIRE, {"name": name, "holder": holder, "now": now, "expires": now + ttl})
        row = cursor.fetchone()
    if row is None:
        LEASE_EVENTS.labels(lease=name, outcome="refused").inc()
        return None
    LEASE_EVENTS.labels(lease=name, outcome="acquired").inc()
    return LeaseGrant(name=name, holder=holder, token=int(row[0]), expires_at=now + ttl)


def lease_renew(*, grant: LeaseGrant, ttl: timedelta) -> LeaseGrant | None:
    """Extend our lease; None when it expired and someone else took it (stop writing at once)."""
    now = clock.now()
    changed = Lease.objects.filter(
        name=grant.name, holder=grant.holder, token=grant.token, expires_at__gt=now
    ).update(renewed_at=now, expires_at=now + ttl)
    if changed != 1:
        LEASE_EVENTS.labels(lease=grant.name, outcome="lost").inc()
        return None
    LEASE_EVENTS.labels(lease=grant.name, outcome="renewed").inc()
    return LeaseGrant(name=grant.name, holder=grant.holder, token=grant.token, expires_at=now + ttl)


def lease_release(*, grant: LeaseGrant) -> bool:
    """Give the lease up at once (clean shutdown) so a standby does not wait for the TTL."""
    now = clock.now()
    changed = Lease.objects.filter(name=grant.name, holder=grant.holder, token=grant.token).update(
        expires_at=now, renewed_at=now
    )
    if changed:
        LEASE_EVENTS.labels(lease=grant.name, outcome="released").inc()
    return changed == 1


def lease_assert_held(*, name: str, token: int) -> None:
    """Fence the current transaction: raise LeaseLost unless `token` still holds a live lease."""
    if not connection.in_atomic_block:
        raise RuntimeError("lease_assert_held must run inside the write transaction it fences")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {_TABLE} WHERE name = %s AND token = %s AND expires_at > %s FOR SHARE",  # noqa: S608
            [name, token, clock.now()],
        )
        if cursor.fetchone() is None:
            LEASE_EVENTS.labels(lease=name, outcome="lost").inc()
            raise LeaseLost(LEASE_LOST.format(name=name, token=token))
