"""Thin Celery tasks: each takes ids (or nothing) and calls one service."""

from __future__ import annotations

from celery import shared_task

from fleetops.notifications.services import deliveries_send_pending, delivery_send
from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope


@shared_task(name="fleetops.notifications.tasks.deliver", ignore_result=True)
def deliver(delivery_id: int) -> None:
    with bound(actor="scheduler:notifications.deliver"):
        delivery_send(delivery_id=delivery_id)


@shared_task(name="fleetops.notifications.tasks.deliver_pending", ignore_result=True, expires=50)
def deliver_pending() -> None:
    with bound(actor="scheduler:notifications.sweep"), heartbeat_scope("notifications.sweep") as beat:
        beat.details["sent"] = deliveries_send_pending()
