"""Protocol reads: statuses with cursors, lag and handoff; state changes, balances and owners."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet

from fleetops.access.models import Organization
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, NotFound
from indexer import selectors as indexer_selectors
from migrations_app.models import (
    Cursor,
    MigrationStatus,
    Protocol,
    ProtocolBalance,
    ProtocolNftOwner,
    ProtocolStateChange,
    ProtocolWriteSpan,
)

PROTOCOL_NOT_FOUND = "No such protocol."
PROTOCOL_AMBIGUOUS = (
    "Protocol {id} runs on several chains ({chains}): name the chain, /api/v1/protocols/<chain>/{id}."
)


@dataclass(frozen=True)
class MigrationView:
    status: str
    cursor: int | None
    lag_blocks: int | None
    handed_off_at: datetime | None
    error: str


@dataclass(frozen=True)
class ProtocolStatus:
    protocol: Protocol
    chain_slug: str
    indexed_height: int | None
    oldest_indexed_height: int | None
    classification_status: str
    classified_at: datetime | None
    contracts: int
    history: MigrationView
    handoff_height: int | None
    current_state: MigrationView
    current_state_start_height: int | None


def protocol_list(*, org: Organization, chain: str | None = None) -> QuerySet[Protocol]:
    qs = Protocol.objects.filter(chain__org=org).select_related("chain")
    return qs if chain is None else qs.filter(chain__slug=chain)


def protocols_visible(*, org_ids: Sequence[int] | None) -> QuerySet[Protocol]:
    qs = Protocol.objects.select_related("chain").order_by("protocol_id", "chain__slug")
    return qs if org_ids is None else qs.filter(chain__org_id__in=org_ids)


def protocol_get(*, org: Organization, protocol_id: str, chain: str | None = None) -> Protocol:
    """The organization's protocol `protocol_id` on `chain` (a slug). Without a chain the protocol
    must run on one chain of the organization only (a Conflict names the chains otherwise). Another
    organization's protocol is simply not found."""
    qs = Protocol.objects.filter(chain__org=org, protocol_id=protocol_id).select_related(
        "chain", "chain__org"
    )
    if chain is not None:
        qs = qs.filter(chain__slug=chain)
    found = list(qs.order_by("chain__slug")[:10])
    if not found:
        raise NotFound(PROTOCOL_NOT_FOUND)
    if len(found) > 1:
        chains = ", ".join(p.chain.slug for p in found)
        raise Conflict(PROTOCOL_AMBIGUOUS.format(id=protocol_id, chains=chains), code="ambiguous")
    return found[0]


def _lag(top: int | None, cursor: int | None) -> int | None:
    return None if top is None or cursor is None else max(0, top - cursor)


def protocol_statuses(protocols: Iterable[Protocol]) -> list[ProtocolStatus]:
    """Statuses of many protocols in a fixed number of queries."""
    protocols = list(protocols)
    names = [n for p in protocols for n in (p.history_cursor_name, p.current_state_cursor_name)]
    cursors = dict(Cursor.objects.filter(name__in=names).values_list("name", "height"))
    indexed = indexer_selectors.indexed_ranges(chain_ids={p.chain_id for p in protocols})
    contracts = dict(
        Protocol.objects.filter(pk__in=[p.pk for p in protocols])
        .annotate(n=Count("contracts"))
        .values_list("pk", "n")
    )
    out = []
    for p in protocols:
        oldest, top = indexed.get(p.chain_id, (None, None))
        h, c = cursors.get(p.history_cursor_name), cursors.get(p.current_state_cursor_name)
        out.append(
            ProtocolStatus(
                protocol=p,
                chain_slug=p.chain.slug,
                indexed_height=top,
                oldest_indexed_height=oldest,
                classification_status=p.classification_status,
                classified_at=p.classified_at,
                contracts=contracts.get(p.pk, 0),
                history=MigrationView(
                    p.history_migration_status, h, _lag(top, h), p.history_handed_off_at, p.history_error
                ),
                handoff_height=p.history_handoff_height,
                current_state=MigrationView(
                    p.current_state_migration_status,
                    c,
                    _lag(top, c),
                    p.current_state_handed_off_at,
                    p.current_state_error,
                ),
                current_state_start_height=p.current_state_start_height,
            )
        )
    return out


def protocol_status(*, protocol: Protocol) -> ProtocolStatus:
    return protocol_statuses([protocol])[0]


def state_change_list(
    *,
    protocol: Protocol,
    account: str | None = None,
    asset: str | None = None,
    kind: str | None = None,
    height_min: int | None = None,
    height_max: int | None = None,
) -> QuerySet[ProtocolStateChange]:
    qs = ProtocolStateChange.objects.filter(protocol=protocol)
    if account:
        qs = qs.filter(account=account)
    if asset:
        qs = qs.filter(asset=asset)
    if kind:
        qs = qs.filter(kind=kind)
    if height_min is not None:
        qs = qs.filter(height__gte=height_min)
    if height_max is not None:
        qs = qs.filter(height__lte=height_max)
    return qs


def balance_list(
    *, protocol: Protocol, account: str | None = None, asset: str | None = None
) -> QuerySet[ProtocolBalance]:
    qs = ProtocolBalance.objects.filter(protocol=protocol)
    if account:
        qs = qs.filter(account=account)
    if asset:
        qs = qs.filter(asset=asset)
    return qs


def owner_list(
    *, protocol: Protocol, owner: str | None = None, asset: str | None = None
) -> QuerySet[ProtocolNftOwner]:
    qs = ProtocolNftOwner.objects.filter(protocol=protocol)
    if owner:
        qs = qs.filter(owner=owner)
    if asset:
        qs = qs.filter(asset=asset)
    return qs


def write_spans(*, protocol: Protocol) -> list[dict[str, Any]]:
    spans = ProtocolWriteSpan.objects.filter(protocol=protocol).order_by("from_height")[:200]
    return [
        {
            "writer": s.writer,
            "from_height": s.from_height,
            "to_height": s.to_height,
            "updated_at": s.updated_at,
        }
        for s in spans
    ]


def history_stuck(
    protocol: Protocol, *, cursor_moved_at: datetime | None, now: datetime | None = None
) -> str:
    """Why the history migration is past its expected time, or "": in progress, and its cursor has
    not moved (nor, before the first window, the migration started) for longer than
    FLEETOPS_PROTOCOL_STUCK_SECONDS."""
    if protocol.history_migration_status != MigrationStatus.IN_PROGRESS:
        return ""
    now = now or clock.now()
    moved = cursor_moved_at or protocol.history_started_at
    if moved is None:
        return ""
    idle = (now - moved).total_seconds()
    limit = settings.FLEETOPS_PROTOCOL_STUCK_SECONDS
    if idle <= limit:
        return ""
    return f"no cursor progress for {idle / 60:.0f} min (expected within {limit / 60:.0f} min)"


def history_cursor_moved_at(*, protocol: Protocol) -> datetime | None:
    return (
        Cursor.objects.filter(name=protocol.history_cursor_name).values_list("updated_at", flat=True).first()
    )
