"""`record(...)`: the one way audit rows are written."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, models, transaction

from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent, PlatformAction
from fleetops.lib import clock
from fleetops.lib.atomic import in_transaction
from fleetops.observability.context import current_request_id
from fleetops.observability.metrics import AUDIT_EVENTS

log = logging.getLogger(__name__)
_encoder = DjangoJSONEncoder()


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, models.Model):
        return str(value.pk)
    return _encoder.default(value)


def changes_between(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """`{"field": [before, after]}` for every field whose value differs."""
    return {
        key: [_jsonable(before.get(key)), _jsonable(after.get(key))]
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def snapshot(instance: models.Model, fields: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in fields}


def record(
    *,
    action: str,
    actor: Actor,
    org: Organization | None,
    target: models.Model | None = None,
    target_type: str = "",
    target_id: str = "",
    target_label: str = "",
    reason: str = "",
    changes: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Write one audit row inside the transaction of the change it describes.

    Outside a transaction it raises `AuditOutsideTransaction`: an audit row committed apart from
    its change is how a crash leaves a change without its row (or a row without its change).
    """
    _require_transaction()
    if target is not None:
        meta = target._meta
        target_type = target_type or f"{meta.app_label}.{meta.model_name}"
        target_id = target_id or str(target.pk)
        target_label = target_label or str(target)[:200]
    event = AuditEvent.objects.create(
        at=clock.now(),
        org=org,
        actor_type=actor.type,
        actor_id=actor.id,
        actor_label=actor.label[:200],
        action=action,
        target_type=target_type,
        target_id=target_id,
        target_label=target_label[:200],
        reason=reason,
        changes=_jsonable(dict(changes or {})),
        metadata=_jsonable(dict(metadata or {})),
        request_id=current_request_id(),
    )
    AUDIT_EVENTS.labels(actor_type=actor.type).inc()
    return event


class AuditOutsideTransaction(RuntimeError):
    """`record()` was called in autocommit: wrap the change and its audit row in one transaction."""


def _require_transaction() -> None:
    if not in_transaction():
        raise AuditOutsideTransaction(
            "audit rows are written inside the transaction of the change they describe; "
            "call record() inside transaction.atomic()"
        )


def record_many(
    *,
    action: str,
    actor: Actor,
    entries: Iterable[Mapping[str, Any]],
    reason: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Write one audit row per entry with one INSERT (set-based engines and bulk operator actions).

    Each entry has `org_id`, `target_type`, `target_id`, `target_label` and optionally `changes`
    and `metadata` (merged over the shared `metadata`). Same transaction rule as `record()`.
    """
    _require_transaction()
    at = clock.now()
    request_id = current_request_id()
    shared = _jsonable(dict(metadata or {}))
    rows = [
        AuditEvent(
            at=at,
            org_id=entry.get("org_id"),
            actor_type=actor.type,
            actor_id=actor.id,
            actor_label=actor.label[:200],
            action=action,
            target_type=entry.get("target_type", ""),
            target_id=str(entry.get("target_id", "")),
            target_label=str(entry.get("target_label", ""))[:200],
            reason=reason,
            changes=_jsonable(dict(entry.get("changes") or {})),
            metadata={**shared, **_jsonable(dict(entry.get("metadata") or {}))},
            request_id=request_id,
        )
        for entry in entries
    ]
    AuditEvent.objects.bulk_create(rows, batch_size=1000)
    if rows:
        AUDIT_EVENTS.labels(actor_type=actor.type).inc(len(rows))
    return len(rows)


AUDIT_PRUNE_BATCH = 10_000


def audit_prune(*, older_than_days: int, actor: Actor) -> int:
    """Delete audit rows older than the retention period, in short batches.

    The append-only trigger lets a DELETE through only inside a transaction that set
    `fleetops.audit_prune`, and never for rows younger than 30 days whatever the caller asks. Each
    batch writes its own `audit.pruned` row in the transaction of its DELETE, so a prune stopped
    half-way leaves a row for every batch it did (and a run that found nothing, one row saying so).
    """
    if older_than_days < 30:
        raise ValueError("audit retention cannot be shorter than 30 days")
    cutoff = clock.now() - timedelta(days=older_than_days)
    deleted = 0
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL fleetops.audit_prune = 'on'")
            cursor.execute(
                f"DELETE FROM {AuditEvent._meta.db_table} WHERE id IN ("  # noqa: S608
                f"SELECT id FROM {AuditEvent._meta.db_table} WHERE at < %s ORDER BY id LIMIT %s)",
                [cutoff, AUDIT_PRUNE_BATCH],
            )
            batch = cursor.rowcount
            if batch or not deleted:
                record(
                    action=PlatformAction.AUDIT_PRUNED,
                    actor=actor,
                    org=None,
                    metadata={
                        "deleted": batch,
                        "cutoff": cutoff.isoformat(),
                        "retention_days": older_than_days,
                    },
                )
        deleted += batch
        if batch < AUDIT_PRUNE_BATCH:
            break
    log.info("audit pruned", extra={"deleted": deleted})
    return deleted
