"""Thin Celery tasks: no arguments, one pass each. Safe to run twice or at once (claims skip
locked rows; every transition is a compare-and-set)."""

from __future__ import annotations

from celery import shared_task

from fleetops.observability.context import bound
from migrations_app.keys.schedule import restake_tick
from migrations_app.keys.verification import verify_tick


@shared_task(name="migrations_app.keys.tasks.restake", ignore_result=True)
def restake() -> None:
    with bound(actor="scheduler:keys.restake"):
        restake_tick()


@shared_task(name="migrations_app.keys.tasks.verify", ignore_result=True)
def verify() -> None:
    with bound(actor="scheduler:keys.verify"):
        verify_tick()
