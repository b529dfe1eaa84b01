from __future__ import annotations

from celery import shared_task

from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope


@shared_task(name="fleetops.observability.tasks.worker_heartbeat", ignore_result=True)
def worker_heartbeat() -> None:
    """Proves beat -> broker -> worker -> database end to end; its age alerts when any link breaks."""
    with bound(actor="scheduler:platform.worker_heartbeat"), heartbeat_scope("platform.worker"):
        pass
