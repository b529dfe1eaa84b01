"""Indexer reads: chain status for the API, the dashboard, the admin and the scrape-time gauges, and
the querysets behind the block / transaction / event / enrichment lists.

Statuses are built for many chains at once with a fixed number of queries (states, leases, sources,
enrichment backlog), whatever the number of chains or sources. The list querysets only filter on
columns the indexes lead with (`block_identity`, `tx_identity`, `tx_chain_hash`, `event_chain_id`,
`event_chain_type_height`, `event_identity`, `enrichment_chain_status`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from django.db import connection
from django.db.models import Count, Field, Q, QuerySet

from fleetops.access.models import Organization
from fleetops.audit.models import AuditEvent
from fleetops.lib import clock
from fleetops.lib.errors import NotFound
from fleetops.observability.models import Lease
from indexer.blocks import lease_name
from indexer.models import (
    Block,
    Chain,
    ChainLagSample,
    ConnectionStatus,
    DegradedReason,
    Enrichment,
    EnrichmentStatus,
    Event,
    IndexerState,
    Mode,
    SourceHealth,
    SyncSource,
    Transaction,
)

CHAIN_NOT_FOUND = "No such chain."
# Rows still owed work (or an operator's attention); `ok` rows are done and never counted.
BACKLOG_STATUSES = (
    EnrichmentStatus.PENDING,
    EnrichmentStatus.RETRYING,
    EnrichmentStatus.FAILED,
    EnrichmentStatus.UNDECODABLE,
)


def chain_list(*, org: Organization) -> QuerySet[Chain]:
    return Chain.objects.filter(org=org).select_related("org", "state")


@functools.cache
def _chain_sql() -> tuple[str, list[Field[Any, Any]], list[Field[Any, Any]]]:
    chain_fields = list(Chain._meta.concrete_fields)
    state_fields = list(IndexerState._meta.concrete_fields)
    cols = [f'c."{f.column}"' for f in chain_fields] + [f's."{f.column}"' for f in state_fields]
    sql = (
        f'SELECT {", ".join(cols)} FROM "{Chain._meta.db_table}" c '  # noqa: S608 - names from the models
        f'LEFT JOIN "{IndexerState._meta.db_table}" s ON s."chain_id" = c."id" '
        'WHERE c."org_id" = %s AND c."slug" = %s'
    )
    return sql, chain_fields, state_fields


def _loaded(model: type[Any], fields: list[Field[Any, Any]], values: Sequence[Any]) -> Any:
    """`model.from_db` with the fields' own converters, as a queryset would apply them."""
    converted = []
    for f, value in zip(fields, values, strict=True):
        for convert in f.get_db_converters(connection):
            value = convert(value, f.get_col(model._meta.db_table), connection)
        converted.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], converted)


def chain_get(*, org: Organization, slug: str) -> Chain:
    """Another organization's chain is simply not found. The chain with its state in one
    hand-written statement (on every chain-scoped API request, the ORM's compilation of the same
    select_related cost more than the query); its `org` is the one the caller resolved, the same
    row, read by the same request."""
    sql, chain_fields, state_fields = _chain_sql()
    with connection.cursor() as cursor:
        cursor.execute(sql, [org.pk, slug])
        row = cursor.fetchone()
    if row is None:
        raise NotFound(CHAIN_NOT_FOUND, code="chain_not_found")
    chain: Chain = _loaded(Chain, chain_fields, row[: len(chain_fields)])
    Chain._meta.get_field("org").set_cached_value(chain, org)
    state_row = row[len(chain_fields) :]
    state = None if state_row[0] is None else _loaded(IndexerState, state_fields, state_row)
    if state is not None:
        IndexerState._meta.get_field("chain").set_cached_value(state, chain)
    Chain._meta.get_field("state").set_cached_value(chain, state)
    return chain


def chains_visible(*, org_ids: Sequence[int] | None) -> QuerySet[Chain]:
    """Chains of these organizations (None: every chain, for superusers and the scrape)."""
    chains = Chain.objects.select_related("org", "state").order_by("slug")
    return chains if org_ids is None else chains.filter(org_id__in=org_ids)


# --- status ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leader:
    holder: str
    token: int
    expires_at: datetime
    live: bool


@dataclass(frozen=True)
class SourceStatus:
    name: str
    rpc_url: str
    websocket_url: str
    priority: int
    enabled: bool
    connection_status: int
    connection_status_label: str
    degraded_reasons: list[dict[str, str]]
    degraded_detail: str
    health: int
    health_label: str
    consecutive_failures: int
    first_failure_at: datetime | None
    last_failure_at: datetime | None
    last_success_at: datetime | None
    next_retry_at: datetime | None
    rate_limited_until: datetime | None
    head_height: int | None
    latency_ms: float | None
    last_error: str
    refused_reason: str = ""

    @property
    def status_name(self) -> str:
        """`connected_degraded`: the machine name, for CSS classes and gauges' docs."""
        return ConnectionStatus(self.connection_status).name.lower()

    @property
    def health_name(self) -> str:
        return SourceHealth(self.health).name.lower()


@dataclass(frozen=True)
class ChainStatus:
    chain: Chain
    head_height: int | None
    last_indexed_height: int | None
    oldest_indexed_height: int | None
    lag_blocks: int | None
    head_moved_at: datetime | None
    mode: str
    paused: bool
    poison_height: int | None
    poison_attempts: int
    last_error: str
    rollback_requested: dict[str, Any] | None
    leader: Leader | None
    sources: list[SourceStatus] = field(default_factory=list)
    enrichment_backlog: dict[str, int] = field(default_factory=dict)
    updated_at: datetime | None = None

    @property
    def slug(self) -> str:
        return self.chain.slug

    @property
    def refused_sources(self) -> list[SourceStatus]:
        """Sources refused for DNS, TLS or protocol errors, until an operator re-enables them."""
        return [s for s in self.sources if s.connection_status == ConnectionStatus.REFUSED]

    @property
    def sources_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for source in self.sources:
            counts[source.connection_status_label] = counts.get(source.connection_status_label, 0) + 1
        return counts

    @property
    def backlog_total(self) -> int:
        return sum(self.enrichment_backlog.values())

    @property
    def stalled(self) -> bool:
        """The chain itself stopped producing blocks (the head is flat and the sources agree)."""
        return self.mode == Mode.IDLE


def _reason_labels(codes: Iterable[Any]) -> list[dict[str, str]]:
    labels = dict(DegradedReason.choices)
    return [{"code": str(code), "label": str(labels.get(str(code), code))} for code in codes or ()]


def source_status(source: SyncSource) -> SourceStatus:
    health = source.health
    status = ConnectionStatus(source.connection_status)
    return SourceStatus(
        name=source.name,
        rpc_url=source.rpc_url,
        websocket_url=source.websocket_url,
        priority=source.priority,
        enabled=source.enabled,
        connection_status=int(status),
        connection_status_label=str(status.label),
        degraded_reasons=_reason_labels(source.degraded_reasons),
        degraded_detail=source.degraded_detail,
        health=int(health),
        health_label=str(health.label),
        consecutive_failures=source.consecutive_failures,
        first_failure_at=source.first_failure_at,
        last_failure_at=source.last_failure_at,
        last_success_at=source.last_success_at,
        next_retry_at=source.next_retry_at,
        rate_limited_until=source.rate_limited_until,
        head_height=source.head_height,
        latency_ms=source.latency_ms,
        last_error=source.last_error,
        refused_reason=source.refused_reason,
    )


def leader_of(lease: Lease | None) -> Leader | None:
    if lease is None:
        return None
    return Leader(
        holder=lease.holder,
        token=lease.token,
        expires_at=lease.expires_at,
        live=lease.expires_at > clock.now(),
    )


def lag_of(state: IndexerState | None) -> int | None:
    if state is None or state.head_height is None:
        return None
    return max(state.head_height - (state.last_indexed_height or 0), 0)


def chain_statuses(chains: Iterable[Chain]) -> list[ChainStatus]:
    """The status of every given chain in four queries (chains should come with `state` selected)."""
    chains = list(chains)
    if not chains:
        return []
    ids = [c.pk for c in chains]
    leases = {lease.name: lease for lease in Lease.objects.filter(name__in=[lease_name(c) for c in chains])}
    sources: dict[int, list[SourceStatus]] = {pk: [] for pk in ids}
    for source in SyncSource.objects.filter(chain_id__in=ids).order_by("chain_id", "priority", "name"):
        sources[source.chain_id].append(source_status(source))
    backlog: dict[int, dict[str, int]] = {pk: {s.value: 0 for s in BACKLOG_STATUSES} for pk in ids}
    rows = (
        Enrichment.objects.filter(chain_id__in=ids, status__in=BACKLOG_STATUSES)
        .values_list("chain_id", "status")
        .annotate(n=Count("id"))
        .values_list("chain_id", "status", "n")
        .order_by()
    )
    for chain_id, status, n in rows:
        backlog[chain_id][status] = n
    result = []
    for chain in chains:
        state = _state_of(chain)
        result.append(
            ChainStatus(
                chain=chain,
                head_height=state.head_height if state else None,
                last_indexed_height=state.last_indexed_height if state else None,
                oldest_indexed_height=state.oldest_indexed_height if state else None,
                lag_blocks=lag_of(state),
                head_moved_at=state.head_moved_at if state else None,
                mode=state.mode if state else Mode.CATCHING_UP.value,
                paused=state.paused if state else False,
                poison_height=state.poison_height if state else None,
                poison_attempts=state.poison_attempts if state else 0,
                last_error=state.last_error if state else "",
                rollback_requested=(
                    {
                        "to_height": state.rollback_requested_to,
                        "reason": state.rollback_requested_reason,
                        "requested_by": state.rollback_requested_by,
                    }
                    if state and state.rollback_requested_to is not None
                    else None
                ),
                leader=leader_of(leases.get(lease_name(chain))),
                sources=sources[chain.pk],
                enrichment_backlog=backlog[chain.pk],
                updated_at=state.updated_at if state else None,
            )
        )
    return result


def _state_of(chain: Chain) -> IndexerState | None:
    """The chain's state (no query when it was selected with the chain); None before the first run."""
    try:
        return chain.state
    except IndexerState.DoesNotExist:
        return None


def chain_status(*, chain: Chain) -> ChainStatus:
    return chain_statuses([chain])[0]


# --- lists -----------------------------------------------------------------------------------------


def block_list(
    *, chain: Chain, height_min: int | None = None, height_max: int | None = None
) -> QuerySet[Block]:
    return _heights(Block.objects.filter(chain=chain), height_min, height_max)


def tx_list(
    *,
    chain: Chain,
    height_min: int | None = None,
    height_max: int | None = None,
    tx_hash: str | None = None,
) -> QuerySet[Transaction]:
    txs = _heights(Transaction.objects.filter(chain=chain), height_min, height_max)
    return txs.filter(hash=tx_hash.upper()) if tx_hash else txs


def tx_positions(*, chain: Chain, tx_hash: str) -> list[tuple[int, int]]:
    """(height, index) of the transactions with this hash (normally one) via `tx_chain_hash`."""
    return list(
        Transaction.objects.filter(chain=chain, hash=tx_hash.upper()).values_list("height", "index")[:10]
    )


def event_list(
    *,
    chain: Chain,
    height_min: int | None = None,
    height_max: int | None = None,
    type: str | None = None,
    tx_hash: str | None = None,
) -> QuerySet[Event]:
    """Events of a chain; a tx hash resolves through its Transaction row to (height, tx_index), so
    the event lookup runs on `event_identity` instead of scanning attributes."""
    events = _heights(Event.objects.filter(chain=chain), height_min, height_max)
    if type:
        events = events.filter(type=type)
    if tx_hash:
        positions = tx_positions(chain=chain, tx_hash=tx_hash)
        if not positions:
            return events.none()
        match = Q()
        for height, index in positions:
            match |= Q(height=height, tx_index=index)
        events = events.filter(match)
    return events


def enrichment_list(*, chain: Chain, status: str | None = None) -> QuerySet[Enrichment]:
    rows = Enrichment.objects.filter(chain=chain)
    return rows.filter(status=status) if status else rows


def _heights(qs: QuerySet[Any], low: int | None, high: int | None) -> QuerySet[Any]:
    if low is not None:
        qs = qs.filter(height__gte=low)
    if high is not None:
        qs = qs.filter(height__lte=high)
    return qs


def lag_samples(*, chain: Chain, since: datetime) -> list[tuple[datetime, int | None, int | None]]:
    """Head and indexed height samples since `since`, oldest first (`lagsample_chain_at`)."""
    return list(
        ChainLagSample.objects.filter(chain=chain, at__gte=since)
        .order_by("at")
        .values_list("at", "head_height", "indexed_height")[:2000]
    )


# --- reads for other apps --------------------------------------------------------------------------
# migrations_app (the protocol classifiers and backfills) reads the indexer only through these and
# the functions above, never through `indexer.models`.

# The chain model under a public name, for other apps' annotations.
ChainModel = Chain


def indexed_ranges(*, chain_ids: Iterable[int] | None = None) -> dict[int, tuple[int | None, int | None]]:
    """(oldest, last) indexed height per chain id (None: every chain); a chain the indexer has never
    started on is absent."""
    states = IndexerState.objects.all()
    if chain_ids is not None:
        states = states.filter(chain_id__in=list(chain_ids))
    return {
        chain_id: (oldest, last)
        for chain_id, oldest, last in states.values_list(
            "chain_id", "oldest_indexed_height", "last_indexed_height"
        )
    }


def indexed_range(*, chain_id: int) -> tuple[int | None, int | None] | None:
    """(oldest, last) indexed height of one chain; None before the indexer's first run."""
    return indexed_ranges(chain_ids=[chain_id]).get(chain_id)


# Raw SQL, not the ORM: a backfill window is thousands of events and needs only these columns (jsonb
# arrives as text; the reader decodes what it keeps). The (chain, type, height) index answers it.
_EVENT_TUPLES = f"""
SELECT height, phase, tx_index, event_index, type, attributes FROM {Event._meta.db_table}
WHERE chain_id = %s AND type = ANY(%s) AND height BETWEEN %s AND %s
"""  # noqa: S608 - table name from the model
_BLOCK_HASH = f"SELECT hash FROM {Block._meta.db_table} WHERE chain_id = %s AND height = %s"  # noqa: S608
# The first `per_value` events (by height) of every distinct value of one attribute, in one query.
_FIRST_BY_ATTRIBUTE = f"""
SELECT value, height, type, attributes FROM (
    SELECT value, height, type, attributes,
           row_number() OVER (PARTITION BY value ORDER BY height) AS n
    FROM (
        SELECT height, type, attributes,
               jsonb_path_query_first(attributes, '$[*] ? (@.key == $k).value',
                                      jsonb_build_object('k', %s::text)) #>> '{{}}' AS value
        FROM {Event._meta.db_table} WHERE chain_id = %s AND type = ANY(%s)
    ) seen WHERE value IS NOT NULL AND value <> ''
) ranked WHERE n <= %s ORDER BY value, n
"""  # noqa: S608 - table name from the model


def event_tuples(
    *, chain_id: int, types: Iterable[str], low: int, high: int
) -> list[tuple[int, str, int | None, int, str, Any]]:
    """(height, phase, tx_index, event_index, type, attributes) of the stored events of `types` in
    [low, high], in no particular order."""
    with connection.cursor() as cursor:
        cursor.execute(_EVENT_TUPLES, [chain_id, sorted(types), low, high])
        return list(cursor.fetchall())


def block_hash(*, chain_id: int, height: int) -> str | None:
    """The hash of the stored block at `height` (None: not indexed, or rolled back)."""
    with connection.cursor() as cursor:
        cursor.execute(_BLOCK_HASH, [chain_id, height])
        row = cursor.fetchone()
    return str(row[0]) if row else None


def first_events_by_attribute(
    *, chain_id: int, types: Iterable[str], key: str, per_value: int
) -> list[tuple[str, int, str, Any]]:
    """(value, height, type, attributes) of the first `per_value` events of `types` for every value
    of attribute `key` (e.g. every contract seen), ordered by value then height."""
    with connection.cursor() as cursor:
        cursor.execute(_FIRST_BY_ATTRIBUTE, [key, chain_id, sorted(types), per_value])
        return list(cursor.fetchall())


# --- console charts --------------------------------------------------------------------------------


def lag_series(*, chain: Chain, since: datetime, bucket_seconds: int) -> list[tuple[datetime, int, int]]:
    """(bucket start, worst lag in blocks, samples) per bucket since `since`, oldest first: one
    grouped range scan of `lagsample_chain_at` (a week is about 10,000 rows)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT date_bin(%s::interval, at, %s::timestamptz) AS b,
                   MAX(GREATEST(head_height - indexed_height, 0)), COUNT(*)
            FROM {ChainLagSample._meta.db_table}
            WHERE chain_id = %s AND at >= %s AND head_height IS NOT NULL
            GROUP BY 1 ORDER BY 1
            """,  # noqa: S608 - table name from the model
            [f"{bucket_seconds} seconds", since, chain.pk, since],
        )
        return [(at, int(lag or 0), int(n)) for at, lag, n in cursor.fetchall()]


def lag_trends(*, chains: Sequence[Chain], since: datetime, bucket_seconds: int) -> dict[int, list[int]]:
    """Worst lag per bucket and chain since `since` (for the dashboard's sparklines), zero-free:
    buckets without samples are skipped. One grouped query for every chain."""
    if not chains:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT chain_id, date_bin(%s::interval, at, %s::timestamptz) AS b,
                   MAX(GREATEST(head_height - indexed_height, 0))
            FROM {ChainLagSample._meta.db_table}
            WHERE chain_id = ANY(%s) AND at >= %s AND head_height IS NOT NULL
            GROUP BY 1, 2 ORDER BY 1, 2
            """,  # noqa: S608 - table name from the model
            [f"{bucket_seconds} seconds", since, [c.pk for c in chains], since],
        )
        out: dict[int, list[int]] = {c.pk: [] for c in chains}
        for chain_id, _, lag in cursor.fetchall():
            out[chain_id].append(int(lag or 0))
    return out


# Audit actions drawn as markers on the lag chart, and the kind each is drawn as.
MARKER_ACTIONS = {
    "indexer.rolled_back": "rollback",
    "indexer.rollback_requested": "rollback",
    "indexer.halted": "halt",
}


def chain_markers(*, chain: Chain, since: datetime, limit: int = 200) -> list[tuple[datetime, str, str]]:
    """(at, kind, label) of the chain's reorgs, rollbacks and halts since `since`, from its audit
    rows (`audit_target` index): a rollback the writer did for a reorg is a "reorg"."""
    rows = (
        AuditEvent.objects.filter(
            target_type__in=("indexer.chain", "indexer.indexerstate"),
            target_id=str(chain.pk),
            action__in=list(MARKER_ACTIONS),
            at__gte=since,
        )
        .order_by("-id")
        .values_list("at", "action", "reason")[:limit]
    )
    markers = []
    for at, action, reason in rows:
        kind = MARKER_ACTIONS[action]
        if action == "indexer.rolled_back" and reason.startswith("reorg"):
            kind = "reorg"
        markers.append((at, kind, f"{action}: {reason}"[:200]))
    return markers[::-1]


def enrichment_backlog_by_org() -> list[tuple[int, int]]:
    """(organization id, rows waiting for enrichment) over every chain (`enrichment_chain_status`)."""
    return list(
        Enrichment.objects.filter(status__in=BACKLOG_STATUSES)
        .order_by()
        .values_list("chain__org_id")
        .annotate(n=Count("id"))
        .values_list("chain__org_id", "n")
    )


EVENT_PAGE_FIELDS = ("id", "height", "phase", "tx_index", "event_index", "type", "attributes")


def event_page_rows(
    *, chain_id: int, before_id: int | None, limit: int, guard: tuple[int, str] | None = None
) -> list[dict[str, Any]]:
    """Up to `limit` events of a chain, newest first, older than `before_id`, as dicts of
    EVENT_PAGE_FIELDS: the events API's unfiltered page (`event_chain_id`), written out because
    building and compiling the same ORM query cost more than running it. `guard` (organization id,
    slug) keeps the rows only when the chain still has them, as the API's chain hint needs."""
    table = Event._meta.db_table
    columns = ", ".join(f'"{Event._meta.get_field(f).column}"' for f in EVENT_PAGE_FIELDS)  # type: ignore[union-attr]
    # Table and column names from the model, values are parameters.
    sql = f'SELECT {columns} FROM "{table}" WHERE "chain_id" = %s'  # noqa: S608
    params: list[Any] = [chain_id]
    if before_id is not None:
        sql += ' AND "id" < %s'
        params.append(before_id)
    if guard is not None:
        sql += (
            f' AND EXISTS (SELECT 1 FROM "{Chain._meta.db_table}" '  # noqa: S608
            'WHERE "id" = %s AND "org_id" = %s AND "slug" = %s)'
        )
        params += [chain_id, *guard]
    sql += ' ORDER BY "id" DESC LIMIT %s'
    params.append(limit)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    out = []
    for row in rows:
        item = dict(zip(EVENT_PAGE_FIELDS, row, strict=True))
        # jsonb arrives as text (Django's loader); parsed as JSONField.from_db_value would.
        text = item["attributes"]
        if isinstance(text, str):
            try:
                item["attributes"] = orjson.loads(text)
            except orjson.JSONDecodeError:  # an integer past 64 bits: the standard library takes it
                item["attributes"] = json.loads(text)
        out.append(item)
    return out
