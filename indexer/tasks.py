"""Thin Celery tasks: each takes no arguments or ids and calls one service."""

from __future__ import annotations

from celery import shared_task

from fleetops.observability.context import bound
from indexer.enrichment import enrichment_tick


@shared_task(name="indexer.tasks.enrich", ignore_result=True)
def enrich() -> dict[str, dict[str, int]]:
    """Decode due enrichment rows of every chain with enrichment on; claims make a second
    concurrent run harmless."""
    with bound(actor="scheduler:indexer.enrich"):
        return enrichment_tick()
