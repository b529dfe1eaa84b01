from __future__ import annotations

from celery import shared_task
from django.conf import settings

from fleetops.audit.actors import Actor
from fleetops.audit.services import audit_prune as _prune
from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope


@shared_task(name="fleetops.audit.tasks.audit_prune", ignore_result=True)
def audit_prune() -> int:
    with bound(actor="scheduler:platform.audit_prune"), heartbeat_scope("platform.audit_prune") as beat:
        deleted = _prune(
            older_than_days=settings.FLEETOPS_AUDIT_RETENTION_DAYS,
            actor=Actor.scheduler("platform.audit_prune"),
        )
        beat.details["deleted"] = deleted
        return deleted
