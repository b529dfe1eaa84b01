"""Thin Celery tasks: the relay pass (beat, every 10 s) and the prune of old sent messages."""

from __future__ import annotations

import dataclasses
import time

from celery import shared_task

from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_beat, heartbeat_scope
from fleetops.outbox.services import outbox_prune, outbox_relay

RELAY_HEARTBEAT = "outbox.relay"
PRUNE_HEARTBEAT = "outbox.prune"


@shared_task(name="fleetops.outbox.tasks.relay", ignore_result=True, expires=8)
def relay() -> None:
    """One relay pass. Its heartbeat says what it did, and fails while the broker refuses sends."""
    with bound(actor="scheduler:outbox.relay"):
        started = time.monotonic()
        try:
            result = outbox_relay()
        except Exception as exc:
            heartbeat_beat(
                name=RELAY_HEARTBEAT, ok=False, duration=time.monotonic() - started, error=repr(exc)
            )
            raise
        heartbeat_beat(
            name=RELAY_HEARTBEAT,
            ok=not result.error,
            duration=time.monotonic() - started,
            error=result.error,
            details=dataclasses.asdict(result),
        )


@shared_task(name="fleetops.outbox.tasks.prune", ignore_result=True, expires=3000)
def prune() -> None:
    with bound(actor="scheduler:outbox.prune"), heartbeat_scope(PRUNE_HEARTBEAT) as beat:
        beat.details["deleted"] = outbox_prune()
