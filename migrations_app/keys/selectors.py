"""Key reads, always scoped to one organization."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Q, QuerySet

from fleetops.access.models import Organization
from fleetops.lib import clock
from fleetops.lib.errors import NotFound
from migrations_app.models.keys import (
    KEY_MIGRATION_DUE,
    AddressGroup,
    Key,
    KeyMigrationStatus,
    RemediationEntry,
    StakeTransaction,
)

KEY_NOT_FOUND = "No such key."
GROUP_NOT_FOUND = "No such address group."


@dataclass(frozen=True, kw_only=True)
class KeyFilter:
    """Which keys a migration moves: by ids, or by group / states / owner (retired keys never)."""

    key_ids: tuple[int, ...] | None = None
    address_group_id: int | None = None
    states: tuple[str, ...] = field(default_factory=tuple)
    owner_address: str = ""

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {}
        if self.key_ids is not None:
            described["key_ids_given"] = len(self.key_ids)
        if self.address_group_id is not None:
            described["address_group"] = self.address_group_id
        if self.states:
            described["states"] = sorted(self.states)
        if self.owner_address:
            described["owner_address"] = self.owner_address
        return described


def key_list(*, org: Organization) -> QuerySet[Key]:
    return Key.objects.filter(org=org).select_related("address_group")


def key_get(*, org: Organization, pk: int) -> Key:
    key = key_list(org=org).filter(pk=pk).first()
    if key is None:
        raise NotFound(KEY_NOT_FOUND)
    return key


def group_list(*, org: Organization) -> QuerySet[AddressGroup]:
    return AddressGroup.objects.filter(org=org).annotate(key_count=Count("keys"))


def group_get(*, org: Organization, pk: int) -> AddressGroup:
    group = AddressGroup.objects.filter(org=org, pk=pk).first()
    if group is None:
        raise NotFound(GROUP_NOT_FOUND, fields={"target_group": [GROUP_NOT_FOUND]})
    return group


def keys_matching(*, org: Organization, flt: KeyFilter) -> QuerySet[Key]:
    keys = Key.objects.filter(org=org, retired_at__isnull=True)
    if flt.key_ids is not None:
        keys = keys.filter(pk__in=flt.key_ids)
    if flt.address_group_id is not None:
        keys = keys.filter(address_group_id=flt.address_group_id)
    if flt.states:
        keys = keys.filter(state__in=flt.states)
    if flt.owner_address:
        keys = keys.filter(owner_address=flt.owner_address)
    return keys


def stuck_since(*, seconds: int | None = None) -> datetime:
    return clock.now() - timedelta(seconds=seconds or settings.FLEETOPS_KEYS_STUCK_SECONDS)


def stuck_keys(queryset: QuerySet[Key], *, seconds: int | None = None) -> QuerySet[Key]:
    """Scheduled or retrying for longer than the threshold since the round began."""
    return queryset.filter(
        migration_status__in=KEY_MIGRATION_DUE, migration_scheduled_at__lt=stuck_since(seconds=seconds)
    )


def key_history(*, key: Key, limit: int = 100) -> Sequence[RemediationEntry]:
    return list(RemediationEntry.objects.filter(key=key).order_by("-id")[:limit])


def key_transactions(*, key: Key, limit: int = 50) -> Sequence[StakeTransaction]:
    return list(StakeTransaction.objects.filter(key=key).order_by("-id")[:limit])


@dataclass(frozen=True)
class MigrationSummary:
    by_status: dict[str, int]
    failed: list[Key]
    oldest_scheduled_at: datetime | None


def bounded_counts_by_status(keys: QuerySet[Key], *, cap: int) -> dict[str, int]:
    """Keys per migration status, each counted up to `cap` + 1 in one query: a LIMITed subquery per
    status on the status index instead of a GROUP BY that reads every key."""
    parts: list[str] = []
    params: list[Any] = []
    for status in KeyMigrationStatus.values:
        inner = keys.filter(migration_status=status).order_by().values("pk")[: cap + 1]
        sql, inner_params = inner.query.sql_with_params()
        # The subquery is Django's own compiled SQL; values travel as parameters.
        parts.append(f"(SELECT COUNT(*) FROM ({sql}) AS bounded)")  # noqa: S608
        params.extend(inner_params)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(parts)}", params)
        row = cursor.fetchone()
    return dict(zip(KeyMigrationStatus.values, (int(n) for n in row), strict=True))


# The dashboard counts each migration status up to this many keys and shows "1,000+" beyond: a
# GROUP BY over every key of a big fleet, every 15 s per open dashboard, reads the whole table.
SUMMARY_COUNT_CAP = 1_000


def migration_summary(*, keys: QuerySet[Key]) -> MigrationSummary:
    """Counts by status (each bounded: at most SUMMARY_COUNT_CAP + 1 rows read through the status
    index), the oldest due key and the ten newest failures."""
    counts = bounded_counts_by_status(keys, cap=SUMMARY_COUNT_CAP)
    oldest = keys.filter(migration_status__in=KEY_MIGRATION_DUE).aggregate(at=Min("migration_scheduled_at"))[
        "at"
    ]
    failed = list(
        keys.filter(migration_status=KeyMigrationStatus.FAILED)
        .select_related("address_group")
        .order_by("-migration_updated_at")[:10]
    )
    return MigrationSummary(
        by_status=counts,
        failed=failed,
        oldest_scheduled_at=oldest,
    )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


def migration_label(key: Key, *, now: datetime | None = None) -> str:
    """What the badge says: "Retrying #2 of 5 — next in 1m 30s", "Failed after 5 attempts"."""
    now = now or clock.now()
    status, attempts, limit = key.migration_status, key.migration_attempts, key.migration_max_attempts
    next_at = key.migration_next_attempt_at
    if status == KeyMigrationStatus.SUCCEEDED:
        return "Succeeded"
    if status == KeyMigrationStatus.FAILED:
        return f"Failed after {attempts} attempt{'s' if attempts != 1 else ''}"
    if status == KeyMigrationStatus.NONE:
        return "—"
    when = (
        "in flight"
        if next_at is None
        else ("due now" if next_at <= now else f"next in {_duration((next_at - now).total_seconds())}")
    )
    if status == KeyMigrationStatus.SCHEDULED:
        return f"Scheduled — {when}"
    number = attempts if next_at is None else attempts + 1
    return f"Retrying #{number} of {limit} — {when}"


def key_overdue(key: Key, *, now: datetime | None = None) -> str:
    """Why the key is past its expected time, or "": due (scheduled or retrying) and its next
    attempt is more than FLEETOPS_KEYS_STUCK_SECONDS in the past, or in flight (claimed, no next
    attempt) with no change for that long. The schedule claims due keys every few seconds, so
    either means the loop is not picking it up."""
    if key.migration_status not in KEY_MIGRATION_DUE:
        return ""
    now = now or clock.now()
    grace = settings.FLEETOPS_KEYS_STUCK_SECONDS
    if key.migration_next_attempt_at is not None:
        late = (now - key.migration_next_attempt_at).total_seconds()
        return f"due {late / 60:.0f} min ago, not picked up (grace {grace // 60} min)" if late > grace else ""
    if key.migration_updated_at is not None:
        idle = (now - key.migration_updated_at).total_seconds()
        return (
            f"in flight for {idle / 60:.0f} min with no outcome (grace {grace // 60} min)"
            if idle > grace
            else ""
        )
    return ""


def overdue_keys(queryset: QuerySet[Key], *, now: datetime | None = None) -> QuerySet[Key]:
    """The keys `key_overdue` flags, as one filter (the due part reads `key_migration_due`)."""
    cut = (now or clock.now()) - timedelta(seconds=settings.FLEETOPS_KEYS_STUCK_SECONDS)
    return queryset.filter(migration_status__in=KEY_MIGRATION_DUE).filter(
        Q(migration_next_attempt_at__lt=cut)
        | Q(migration_next_attempt_at__isnull=True, migration_updated_at__lt=cut)
    )
