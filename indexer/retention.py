"""Optional retention of a chain's indexed rows (seed 004, phase 8), beside `indexer.services`.

`Chain.retain_heights` (None: keep forever) is changed only by `chain_set_retention` (admin role,
one audit row). `partitions_retention_apply` then drops whole height ranges whose every height is
below the horizon (tip - retain_heights + 1): the block, transaction and event partitions of the
range in one transaction, with the chain's enrichment rows below it, `oldest_indexed_height` moved
up to the range's end, and one audit row per range. It never drops the range holding the indexed
tip, and never deletes single rows from the tables (a DROP frees the space at once, no vacuum).
`partitions_maintain` is what the periodic task and `manage.py indexer_partitions` run: ranges
ahead of every chain's tip, then retention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connection, transaction

from fleetops.access.models import Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib.cas import cas_update
from fleetops.lib.errors import ValidationFailed
from fleetops.lib.reason import clean_reason
from indexer import partitions
from indexer.models import Chain, Enrichment, IndexerState

log = logging.getLogger(__name__)

RETENTION_CHANGED = "indexer.retention_changed"
PARTITION_DROPPED = "indexer.partition_dropped"
RETENTION_ROLE = "changing a chain's retention needs the admin role in its organization"
RETENTION_INVALID = (
    "retain_heights must be empty (keep forever) or an integer of at least {low} (finality depth + 1, "
    "so a rollback always finds its rows)"
)
RETENTION_MAX = 10**12
# The actor of the periodic task and the command.
MAINTAINER = Actor.scheduler("indexer_partitions")


def _validate(chain: Chain, value: Any) -> int | None:
    if value is None:
        return None
    low = chain.finality_depth + 1
    message = RETENTION_INVALID.format(low=low)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= RETENTION_MAX:
        raise ValidationFailed(message, fields={"retain_heights": [message]})
    return value


def chain_set_retention(*, chain: Chain, retain_heights: int | None, actor: Actor, reason: str) -> bool:
    """Set how many heights below the tip the chain keeps (None: forever). Admin role; one locked
    read, one UPDATE and one audit row. Returns False when it already was so. The drop itself is
    done by the next `partitions_retention_apply` (periodic task or command)."""
    reason = clean_reason(reason)
    value = _validate(chain, retain_heights)
    require_role(
        actor=actor,
        org=chain.org,
        role=Role.ADMIN,
        what=f"set retention on {chain.slug}",
        message=RETENTION_ROLE,
        target=chain,
        asked={"retain_heights": value},
    )
    with transaction.atomic():
        row = Chain.objects.select_for_update().get(pk=chain.pk)
        if row.retain_heights == value:
            return False
        cas_update(
            Chain.objects.filter(pk=row.pk, retain_heights=row.retain_heights),
            operation="indexer_set_retention",
            retain_heights=value,
        )
        record(
            action=RETENTION_CHANGED,
            actor=actor,
            org=chain.org,
            target=row,
            reason=reason,
            changes={"retain_heights": [row.retain_heights, value]},
            metadata={"chain": chain.slug},
        )
    chain.retain_heights = value
    return True


@dataclass(frozen=True)
class DroppedRange:
    start: int
    end: int
    partitions: list[str]
    rows: int


Droppable = tuple[int, int, list[partitions.RangePartition]]


def _droppable(chain: Chain, horizon: int, tip: int) -> list[Droppable]:
    """Height ranges every table has a partition for and that lie wholly below the horizon and
    below the tip, lowest first."""
    by_range: dict[tuple[int, int], list[partitions.RangePartition]] = {}
    for model in partitions.PARTITIONED:
        for part in partitions.range_partitions(chain_pk=chain.pk, table=model._meta.db_table):
            if part.end <= horizon and part.end <= tip:
                by_range.setdefault((part.start, part.end), []).append(part)
    return [(s, e, parts) for (s, e), parts in sorted(by_range.items())]


def partitions_retention_apply(*, chain: Chain, actor: Actor = MAINTAINER) -> list[DroppedRange]:
    """Drop the chain's height ranges wholly below its retention horizon (see the module doc).
    Each range is one transaction: the state row locked first (the writer's order: state, then the
    tables), the partitions dropped under a lock timeout, one audit row. Returns what was dropped."""
    if chain.retain_heights is None:
        return []
    state = IndexerState.objects.filter(chain=chain).first()
    if state is None or state.last_indexed_height is None:
        return []
    horizon = state.last_indexed_height - chain.retain_heights + 1
    dropped: list[DroppedRange] = []
    for start, end, parts in _droppable(chain, horizon, state.last_indexed_height):
        with transaction.atomic(), connection.cursor() as cur:
            locked = IndexerState.objects.select_for_update().get(chain=chain)
            tip = locked.last_indexed_height
            # A rollback since we looked may have moved the tip down under this range: keep it.
            if tip is None or end > tip - chain.retain_heights + 1 or end > tip:
                break
            partitions._begin(cur, chain.pk)
            # Deferred foreign-key checks of rows written earlier in an enclosing transaction
            # would make PostgreSQL refuse the DROP ("pending trigger events"): run them now.
            cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
            rows = sum(max(p.rows, 0) for p in parts)
            for part in parts:  # PARTITIONED order: blocks, transactions, events
                cur.execute(f"DROP TABLE {connection.ops.quote_name(part.name)}")
            Enrichment.objects.filter(chain=chain, height__lt=end).delete()
            oldest = locked.oldest_indexed_height
            if oldest is None or oldest < end:
                cas_update(
                    IndexerState.objects.filter(chain=chain, oldest_indexed_height=oldest),
                    operation="indexer_retention",
                    oldest_indexed_height=end,
                )
            record(
                action=PARTITION_DROPPED,
                actor=actor,
                org=chain.org,
                target=chain,
                reason=f"retention: keep {chain.retain_heights} heights below the tip {tip}",
                changes={"oldest_indexed_height": [oldest, max(oldest or 0, end)]},
                metadata={
                    "chain": chain.slug,
                    "from_height": start,
                    "to_height": end - 1,
                    "partitions": [p.name for p in parts],
                    "rows_estimate": rows,
                },
            )
        dropped.append(DroppedRange(start, end, [p.name for p in parts], rows))
    if dropped:
        partitions.partitions_forget()
    return dropped


@dataclass
class MaintainResult:
    created: dict[str, list[str]]
    dropped: dict[str, list[DroppedRange]]
    failed: dict[str, str]


def partitions_maintain(*, chains: list[Chain] | None = None, actor: Actor = MAINTAINER) -> MaintainResult:
    """For every chain (or the given ones): ranges ahead of its tip (a partition of headroom), then
    its retention. A chain that fails (a lock timeout) is reported and tried again next run."""
    result = MaintainResult({}, {}, {})
    rows = chains if chains is not None else list(Chain.objects.select_related("org", "state"))
    size = partitions.partition_heights()
    for chain in rows:
        try:
            state = IndexerState.objects.filter(chain=chain).first()
            tip = state.last_indexed_height if state and state.last_indexed_height is not None else 0
            result.created[chain.slug] = partitions.partitions_ensure(
                chain=chain, up_to_height=tip + size, from_height=tip
            )
            result.dropped[chain.slug] = partitions_retention_apply(chain=chain, actor=actor)
        except DatabaseError as exc:
            connection.close_if_unusable_or_obsolete()
            log.warning("indexer partition maintenance failed", exc_info=True, extra={"chain": chain.slug})
            result.failed[chain.slug] = f"{exc.__class__.__name__}: {exc}"[:300]
    return result
