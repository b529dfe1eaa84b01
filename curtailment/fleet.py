"""Device sync and telemetry polling: the gateway's view copied into PostgreSQL in bulk."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction

from curtailment.gateway import FleetGateway, Sample
from curtailment.models import Device, DeviceSample, OrgCurtailmentConfig
from fleetops.access.models import Organization
from fleetops.lib import clock
from fleetops.lib.transition import bound_cursor

log = logging.getLogger(__name__)
SYNCED_FIELDS = ["name", "model", "site", "driver", "pairing_status", "status", "rated_power_w", "synced_at"]


@dataclass(frozen=True)
class SyncResult:
    created: int
    updated: int
    deleted: int


def fleet_sync(*, org: Organization, gateway: FleetGateway) -> SyncResult:
    """Upsert the gateway's devices; soft-delete the ones it no longer reports."""
    reported = {d.identifier: d for d in gateway.list_devices()}
    now = clock.now()
    with transaction.atomic():
        existing = {
            d.identifier: d
            for d in Device.objects.select_for_update().filter(org=org, deleted_at__isnull=True)
        }
        new, changed = [], []
        for identifier, d in reported.items():
            values = {
                "name": d.name,
                "model": d.model,
                "site": d.site,
                "driver": d.driver,
                "pairing_status": d.pairing_status,
                "status": d.status,
                "rated_power_w": d.rated_power_w,
                "synced_at": now,
            }
            device = existing.get(identifier)
            if device is None:
                new.append(Device(org=org, identifier=identifier, **values))
            else:
                for key, value in values.items():
                    setattr(device, key, value)
                changed.append(device)
        Device.objects.bulk_create(new, batch_size=2000)
        Device.objects.bulk_update(changed, SYNCED_FIELDS, batch_size=2000)
        gone = [device.pk for identifier, device in existing.items() if identifier not in reported]
        Device.objects.filter(pk__in=gone).update(deleted_at=now)
    return SyncResult(created=len(new), updated=len(changed), deleted=len(gone))


def telemetry_store(
    *,
    org: Organization,
    samples: list[Sample],
    keep_history: bool = True,
    device_ids: Mapping[str, int] | None = None,
) -> int:
    """Bulk-insert samples (unless `keep_history` is off) and move each device's latest reading
    onto the device row, never backwards in time. `device_ids` (identifier -> device id of `org`)
    spares the lookup when the caller already holds the devices (the reconciler's targets)."""
    if not samples:
        return 0
    # Array parameters (one per column, binary where large), not a placeholder per value: the
    # statements keep a constant size whatever the number of samples (100,000 devices).
    table = Device._meta.db_table
    ids = device_ids
    if ids is None:
        with bound_cursor() as cursor:
            cursor.execute(
                f"SELECT identifier, id FROM {table} WHERE org_id = %s AND deleted_at IS NULL"  # noqa: S608
                " AND identifier = ANY(%b::text[])",
                [org.pk, [s.identifier for s in samples]],
            )
            ids = dict(cursor.fetchall())
    rows = [(ids[s.identifier], s) for s in samples if s.identifier in ids]
    if keep_history:
        DeviceSample.objects.bulk_create(
            [
                DeviceSample(
                    device_id=device_id,
                    taken_at=s.taken_at,
                    power_w=s.power_w,
                    hash_rate_hs=s.hash_rate_hs,
                    efficiency_j_th=s.efficiency_j_th,
                )
                for device_id, s in rows
            ],
            batch_size=5000,
        )
    for start in range(0, len(rows), 20_000):
        chunk = rows[start : start + 20_000]
        with bound_cursor() as cursor:
            cursor.execute(
                f"""
                UPDATE {table} AS d SET last_sample_at = v.taken_at, last_power_w = v.power_w,
                       last_hash_rate_hs = v.hash_rate_hs, last_efficiency_j_th = v.efficiency_j_th
                FROM unnest(%b::bigint[], %b::timestamptz[], %b::float8[], %b::float8[], %b::float8[])
                     AS v(id, taken_at, power_w, hash_rate_hs, efficiency_j_th)
                WHERE d.id = v.id AND d.id = ANY(%b::bigint[])
                      AND (d.last_sample_at IS NULL OR d.last_sample_at <= v.taken_at)
                """,  # noqa: S608 - table name from the model, values are parameters
                [
                    [device_id for device_id, _ in chunk],
                    [s.taken_at for _, s in chunk],
                    [s.power_w for _, s in chunk],
                    [s.hash_rate_hs for _, s in chunk],
                    [s.efficiency_j_th for _, s in chunk],
                    # The ids again as a plain condition: the planner fetches these rows by the
                    # primary key instead of hashing the whole fleet for a batch of 1,000.
                    [device_id for device_id, _ in chunk],
                ],
            )
    return len(rows)


def telemetry_poll(*, org: Organization, gateway: FleetGateway, identifiers: list[str] | None = None) -> int:
    if identifiers is None:
        identifiers = list(
            Device.objects.filter(org=org, deleted_at__isnull=True).values_list("identifier", flat=True)
        )
    return telemetry_store(org=org, samples=gateway.telemetry(identifiers))


def telemetry_prune(*, older_than: timedelta | None = None) -> int:
    cutoff = clock.now() - (older_than or timedelta(days=settings.FLEETOPS_TELEMETRY_RETENTION_DAYS))
    deleted, _ = DeviceSample.objects.filter(taken_at__lt=cutoff).delete()
    return deleted


def orgs_with_gateway() -> list[OrgCurtailmentConfig]:
    return list(OrgCurtailmentConfig.objects.exclude(gateway_url="").select_related("org"))
