from __future__ import annotations

import logging

from celery import shared_task

from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope
from fleetops.observability.history import history_sample

log = logging.getLogger(__name__)


@shared_task(name="fleetops.observability.tasks.worker_heartbeat", ignore_result=True)
def worker_heartbeat() -> None:
    """Proves beat -> broker -> worker -> database end to end; its age alerts when any link breaks."""
    with bound(actor="scheduler:platform.worker_heartbeat"), heartbeat_scope("platform.worker"):
        pass
    # The sparklines' history rides on this tick (a sample every few minutes); outside the
    # heartbeat scope, so a failing sampler never makes the liveness probe look dead.
    try:
        history_sample()
    except Exception:
        log.exception("history sampling failed")
