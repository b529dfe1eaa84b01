"""Thin Celery tasks: each takes no arguments or ids and calls one service."""

from __future__ import annotations

from celery import shared_task

from fleetops.observability.context import bound
from fleetops.observability.heartbeats import heartbeat_scope
from indexer.enrichment import enrichment_tick
from indexer.retention import partitions_maintain

PARTITIONS_HEARTBEAT = "indexer.partitions"


@shared_task(name="indexer.tasks.enrich", ignore_result=True)
def enrich() -> dict[str, dict[str, int]]:
    """Decode due enrichment rows of every chain with enrichment on; claims make a second
    concurrent run harmless."""
    with bound(actor="scheduler:indexer.enrich"):
        return enrichment_tick()


@shared_task(name="indexer.tasks.partitions", ignore_result=True, expires=3000)
def maintain_partitions() -> None:
    """Height-range partitions ahead of every chain's tip, then each chain's retention. Idempotent
    (advisory lock per chain): a second concurrent run finds nothing left to do."""
    with bound(actor="scheduler:indexer.partitions"), heartbeat_scope(PARTITIONS_HEARTBEAT) as beat:
        result = partitions_maintain()
        beat.details.update(
            created=sum(len(v) for v in result.created.values()),
            dropped=sum(len(v) for v in result.dropped.values()),
            failed=result.failed,
        )
        if result.failed:
            raise RuntimeError(f"partition maintenance failed for {', '.join(sorted(result.failed))}")
