"""Thin Celery tasks: each takes no arguments or ids and calls one service."""

from __future__ import annotations

import logging

from celery import shared_task

from curtailment.fleet import fleet_sync, orgs_with_gateway, telemetry_poll, telemetry_prune
from curtailment.gateway import FleetGateway, GatewayError
from curtailment.reconciler import reconcile_tick
from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope

log = logging.getLogger(__name__)


@shared_task(name="curtailment.tasks.reconcile", ignore_result=True)
def reconcile() -> None:
    with bound(actor="scheduler:curtailment.reconciler"):
        reconcile_tick()


@shared_task(name="curtailment.tasks.telemetry_poll", ignore_result=True)
def poll_telemetry() -> None:
    with bound(actor="scheduler:curtailment.telemetry"), heartbeat_scope("curtailment.telemetry") as beat:
        stored = 0
        for config in orgs_with_gateway():
            with FleetGateway(config.gateway_url) as gateway:
                try:
                    stored += telemetry_poll(org=config.org, gateway=gateway)
                except GatewayError as exc:
                    log.warning("telemetry poll of %s failed: %s", config.org, exc)
        beat.details["samples"] = stored


@shared_task(name="curtailment.tasks.fleet_sync", ignore_result=True)
def sync_fleets() -> None:
    with bound(actor="scheduler:curtailment.fleet_sync"), heartbeat_scope("curtailment.fleet_sync"):
        for config in orgs_with_gateway():
            with FleetGateway(config.gateway_url) as gateway:
                fleet_sync(org=config.org, gateway=gateway)


@shared_task(name="curtailment.tasks.telemetry_prune", ignore_result=True)
def prune_telemetry() -> int:
    with bound(actor="scheduler:curtailment.telemetry_prune"), heartbeat_scope("curtailment.telemetry_prune"):
        return telemetry_prune()
