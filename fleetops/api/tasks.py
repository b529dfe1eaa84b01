from __future__ import annotations

from celery import shared_task

from fleetops.api import ratelimit
from fleetops.api.idempotency import idempotency_prune as _prune
from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope


@shared_task(name="fleetops.api.tasks.idempotency_prune", ignore_result=True)
def idempotency_prune() -> int:
    with bound(actor="scheduler:platform.idempotency_prune"), heartbeat_scope("platform.idempotency_prune"):
        # The rate counters of windows long over go in the same sweep (PostgreSQL store only).
        return _prune() + ratelimit.prune()
