"""Enrichment: events whose payload needs the external decoder, decoded after ingest by workers.

Ingest writes one `pending` row per such event inside the block transaction (`enrichment_rows_for`,
same identity as the event) and never waits for the decoder, so an outage never slows ingest.

A worker round (`enrichment_run_once`):
1. claim: in one short transaction, lock due rows with SKIP LOCKED and push their `next_attempt_at`
   to now + lease. That timestamp is the claim's token: other workers skip the rows (not due) until
   the lease runs out, which is also how a crashed worker's rows come back;
2. decode outside any transaction, with bounded concurrency;
3. verdicts through the transition kernel's set-based variant (`transition_rows`, one UPDATE per
   chunk): each row moves only along an edge of `ENRICHMENT_MACHINE` from the status it was claimed
   in, and only while its attempts and the claim's token still match: ok | retrying (attempts + 1,
   backoff with jitter) | failed (max attempts) | undecodable. A row refused there was taken over
   or deleted by a rollback: counted as race_lost, never written. Verdicts are engine steps, not
   audited (the outcome counter is their record). Rows the open breaker refused without HTTP are
   released without counting an attempt.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import Count, F

from fleetops.lib import clock
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import ValidationFailed
from fleetops.lib.transition import transition_rows
from fleetops.observability.heartbeats import heartbeat_beat
from indexer.blocks import IndexedBlock
from indexer.decoder import BreakerOpen, BreakerState, DecoderClient, DecoderUnavailable, Undecodable
from indexer.metrics import DECODE_CONCURRENCY, ENRICHMENT, ENRICHMENT_ROUND, ENRICHMENT_ROUND_FAILURES
from indexer.models import (
    ENRICHMENT_CLAIMABLE,
    ENRICHMENT_MACHINE,
    Chain,
    Enrichment,
    EnrichmentStatus,
    Phase,
)
from indexer.rpc import parse

log = logging.getLogger(__name__)

ENRICHMENT_COPY_COLUMNS: tuple[str, ...] = (
    "chain_id",
    "height",
    "phase",
    "tx_index",
    "event_index",
    "encoding",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "last_error",
    "decoded",
    "updated_at",
)
# Event types whose `data` attribute only the external decoder understands (the simulator's
# `payload` events carry `encoding=sim-hex`).
DECODER_EVENT_TYPES = frozenset({"payload"})

BACKOFF_BASE_SECONDS = 10.0
BACKOFF_CAP_SECONDS = 3600.0
MIN_RETRY_SECONDS = 1.0
TICK_BUDGET_SECONDS = 5.0
ERROR_LIMIT = 1000

NO_DECODER_URL = "no decoder: set INDEXER_DECODER_URL or give the chain an enabled sync source"
# A worker's verdicts are the states a claimed row may move to (ok, retrying, failed, undecodable);
# the other outcomes are not states: claimed, released (the breaker opened mid-round), race_lost.
VERDICTS: tuple[str, ...] = ENRICHMENT_MACHINE.targets(EnrichmentStatus.PENDING)
OUTCOMES = ("claimed", *VERDICTS, "released", "race_lost", "breaker_open")

_rng = random.Random()  # noqa: S311 - jitter, not cryptography


# --- ingest side --------------------------------------------------------------------------------------


def _decoder_input(event: parse.Event) -> tuple[str, str] | None:
    """(encoding, data) when the event needs the decoder."""
    if event.type not in DECODER_EVENT_TYPES:
        return None
    attributes: dict[str, str] = {}
    for attribute in event.attributes:
        attributes.setdefault(attribute.key, attribute.value)
    data = attributes.get("data", "")
    if not data:
        return None
    return attributes.get("encoding", "")[:40], data


def enrichment_rows_for(
    chain_id: int, item: IndexedBlock, *, now: datetime | None = None
) -> list[tuple[Any, ...]]:
    """Pending Enrichment rows (in `ENRICHMENT_COPY_COLUMNS` order) for the block's events that need
    the decoder. Identities (height, phase, tx_index, event_index) walk the events exactly like
    `indexer.ingest.event_rows`, so each row points at its stored event."""
    # Due at once: a set `next_attempt_at` keeps the claim query a range scan on the partial index.
    at = now or clock.now()
    height, results = item.height, item.results
    located: list[tuple[str, int | None, int, parse.Event]] = [
        (phase.value, None, i, event)
        for phase, events in (
            (Phase.BEGIN_BLOCK, results.begin_block_events),
            (Phase.END_BLOCK, results.end_block_events),
            (Phase.FINALIZE_BLOCK, results.finalize_block_events),
        )
        for i, event in enumerate(events)
    ]
    located += [
        (Phase.TX.value, tx.index, i, event) for tx in results.txs for i, event in enumerate(tx.events)
    ]
    rows: list[tuple[Any, ...]] = []
    for phase, tx_index, event_index, event in located:
        wanted = _decoder_input(event)
        if wanted is None:
            continue
        encoding, data = wanted
        identity = (chain_id, height, phase, tx_index, event_index)
        rows.append((*identity, encoding, data, EnrichmentStatus.PENDING.value, 0, at, "", None, at))
    return rows


# --- claim ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    status: str
    attempts: int
    payload: str


@dataclass(frozen=True)
class Claim:
    chain_id: int
    token: datetime  # the next_attempt_at this claim wrote; verdicts are fenced on it
    rows: list[ClaimedRow]


def _lease_seconds(lease_seconds: float | None) -> float:
    return float(
        lease_seconds if lease_seconds is not None else settings.FLEETOPS_INDEXER_ENRICHMENT_LEASE_SECONDS
    )


def enrichment_claim(
    *, chain: Chain, limit: int = 200, now: datetime | None = None, lease_seconds: float | None = None
) -> Claim:
    """Claim up to `limit` due rows for one worker, committed before any decoding starts."""
    at = now or clock.now()
    token = at + timedelta(seconds=_lease_seconds(lease_seconds))
    fields = ("id", "status", "attempts", "payload")
    due = Enrichment.objects.select_for_update(skip_locked=True).filter(
        chain=chain, status__in=ENRICHMENT_CLAIMABLE
    )
    with transaction.atomic():
        # Two range scans on the partial index instead of one `ORDER BY ... NULLS FIRST` it cannot
        # serve: never-scheduled rows (NULL) first, then the most overdue.
        picked = list(
            due.filter(next_attempt_at__isnull=True)
            # The order is moot among NULLs; it steers the planner to the partial index's NULL end
            # instead of filtering every pending row of the chain.
            .order_by(F("next_attempt_at").desc(nulls_first=True))
            .values_list(*fields)[:limit]
        )
        if len(picked) < limit:
            picked += list(
                due.filter(next_attempt_at__lte=at)
                .order_by("next_attempt_at", "id")
                .values_list(*fields)[: limit - len(picked)]
            )
        if picked:
            Enrichment.objects.filter(id__in=[row[0] for row in picked]).update(next_attempt_at=token)
    return Claim(chain_id=chain.pk, token=token, rows=[ClaimedRow(*row) for row in picked])


# --- decode ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    row: ClaimedRow
    outcome: str  # ok | unavailable | undecodable | released
    decoded: dict[str, Any] | None = None
    error: str = ""


def _decode_one(decoder: DecoderClient, row: ClaimedRow) -> Verdict:
    try:
        return Verdict(row, EnrichmentStatus.OK.value, decoded=decoder.decode(row.payload))
    except BreakerOpen as exc:
        return Verdict(row, "released", error=str(exc))
    except Undecodable as exc:
        return Verdict(row, EnrichmentStatus.UNDECODABLE.value, error=str(exc))
    except DecoderUnavailable as exc:
        return Verdict(row, "unavailable", error=str(exc))
    except Exception as exc:
        # A bug must not strand the claim until the lease runs out: the row retries and, if it keeps
        # failing, ends `failed` where an operator sees it.
        log.exception("decoding enrichment %s failed unexpectedly", row.id)
        return Verdict(row, "unavailable", error=f"{exc.__class__.__name__}: {exc}")


def enrichment_decode(
    *, decoder: DecoderClient, rows: Sequence[ClaimedRow], concurrency: int = 4
) -> list[Verdict]:
    """Decode outside any transaction, at most `concurrency` requests at a time."""
    if not rows:
        return []
    verdicts: list[Verdict] = []
    rest = list(rows)
    if decoder.breaker.state is not BreakerState.CLOSED:
        # Half-open: one probe decides whether the others go out at all.
        verdicts.append(_decode_one(decoder, rest.pop(0)))
    if len(rest) <= 1 or concurrency <= 1:
        verdicts += [_decode_one(decoder, row) for row in rest]
        return verdicts
    with ThreadPoolExecutor(max_workers=min(concurrency, len(rest)), thread_name_prefix="decode") as pool:
        verdicts += pool.map(lambda row: _decode_one(decoder, row), rest)
    return verdicts


# --- verdicts -----------------------------------------------------------------------------------------

# Columns a verdict sets besides the status (attempts move by increment in the same statement).
VERDICT_FIELDS = ("next_attempt_at", "last_error", "decoded")


def _verdict_row(verdict: Verdict, *, at: datetime, max_attempts: int, rng: random.Random) -> dict[str, Any]:
    """The kernel row of one verdict: the status edge, the values it sets, the attempts it expects."""
    row = verdict.row
    attempt = row.attempts + 1
    decoded = None
    next_at: datetime | None = None
    if verdict.outcome == EnrichmentStatus.OK:
        status, error = EnrichmentStatus.OK, ""
        decoded = verdict.decoded
    elif verdict.outcome == EnrichmentStatus.UNDECODABLE:
        status, error = EnrichmentStatus.UNDECODABLE, verdict.error
    elif attempt >= max_attempts:
        status, error = EnrichmentStatus.FAILED, verdict.error
    else:
        status, error = EnrichmentStatus.RETRYING, verdict.error
        delay = backoff_delay(attempt, base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS, rng=rng)
        next_at = at + timedelta(seconds=max(MIN_RETRY_SECONDS, delay))
    return {
        "pk": row.id,
        "from": row.status,
        "to": status.value,
        "attempts": row.attempts,
        "next_attempt_at": next_at,
        "last_error": error[:ERROR_LIMIT],
        "decoded": decoded,
    }


def enrichment_record(
    *,
    chain: Chain,
    claim: Claim,
    verdicts: Sequence[Verdict],
    now: datetime | None = None,
    max_attempts: int | None = None,
    release_at: datetime | None = None,
    rng: random.Random | None = None,
) -> dict[str, int]:
    """Write the verdicts of one claim by compare-and-set; returns counts by outcome."""
    at = now or clock.now()
    limit = max_attempts if max_attempts is not None else settings.FLEETOPS_INDEXER_ENRICHMENT_MAX_ATTEMPTS
    counts = dict.fromkeys(OUTCOMES, 0)
    released = [v.row.id for v in verdicts if v.outcome == "released"]
    written = [
        _verdict_row(v, at=at, max_attempts=limit, rng=rng or _rng)
        for v in verdicts
        if v.outcome != "released"
    ]
    # Fenced on the claim: the status it was claimed in (exact_from), its attempts (match) and the
    # claim's token, which is the row's next_attempt_at until this verdict sets it (where).
    moved = transition_rows(
        model=Enrichment,
        machine=ENRICHMENT_MACHINE,
        rows=written,
        set_fields=VERDICT_FIELDS,
        match=("attempts",),
        exact_from=True,
        where={"chain": claim.chain_id, "next_attempt_at": claim.token},
        increments={"attempts": 1},
        updates={"updated_at": at},
        operation="enrichment_verdict",
    )
    to_of = {row["pk"]: row["to"] for row in written}
    for pk in moved:
        counts[to_of[pk]] += 1
    if released:
        # Back when this worker's breaker lets calls through again; another worker's breaker may
        # already be closed, so the rows do not wait for the whole lease.
        counts["released"] = Enrichment.objects.filter(
            id__in=released, next_attempt_at=claim.token, status__in=ENRICHMENT_CLAIMABLE
        ).update(next_attempt_at=max(release_at or at, at))
    if len(released) != counts["released"]:
        # The kernel counted the verdicts that lost; released rows are a claim column, counted here.
        note_race_lost("enrichment_release", expected=len(released), changed=counts["released"])
    lost = len(verdicts) - sum(counts[k] for k in (*VERDICTS, "released"))
    if lost:
        counts["race_lost"] = lost
    for outcome in (*VERDICTS, "released", "race_lost"):
        if counts[outcome]:
            ENRICHMENT.labels(chain=chain.slug, outcome=outcome).inc(counts[outcome])
    return counts


# --- one round, the loop, the tick --------------------------------------------------------------------


def enrichment_run_once(
    *,
    chain: Chain,
    decoder: DecoderClient,
    limit: int = 200,
    concurrency: int = 4,
    now: datetime | None = None,
    max_attempts: int | None = None,
    lease_seconds: float | None = None,
) -> dict[str, int]:
    """One claim-decode-verdict round over up to `limit` due rows; counts by outcome (`OUTCOMES`).
    Safe with any number of workers at once: claims are disjoint and verdicts fenced."""
    started = time.monotonic()
    counts = dict.fromkeys(OUTCOMES, 0)
    if decoder.breaker.state is BreakerState.OPEN:
        # Claiming only to release again would churn rows; the breaker's cool-down is the wait.
        counts["breaker_open"] = 1
        return counts
    claim = enrichment_claim(chain=chain, limit=limit, now=now, lease_seconds=lease_seconds)
    if claim.rows:
        verdicts = enrichment_decode(decoder=decoder, rows=claim.rows, concurrency=concurrency)
        at = now or clock.now()
        counts.update(
            enrichment_record(
                chain=chain,
                claim=claim,
                verdicts=verdicts,
                now=at,
                max_attempts=max_attempts,
                release_at=at + timedelta(seconds=decoder.breaker.retry_in()),
            )
        )
    counts["claimed"] = len(claim.rows)
    counts["breaker_open"] = int(decoder.breaker.state is BreakerState.OPEN)
    ENRICHMENT_ROUND.labels(chain=chain.slug).observe(time.monotonic() - started)
    return counts


def enrichment_backlog(*, chain: Chain, include_ok: bool = False) -> dict[str, int]:
    """Rows per status, every status present. `ok` (which grows forever) only when asked for: the
    backlog is what still needs work or an operator."""
    statuses = [s for s in EnrichmentStatus.values if include_ok or s != EnrichmentStatus.OK]
    backlog = dict.fromkeys(statuses, 0)
    rows = (
        Enrichment.objects.filter(chain=chain, status__in=statuses)
        .values_list("status")
        .annotate(n=Count("*"))
        .order_by()
    )
    backlog.update(dict(rows))
    return backlog


def decoder_url_for(chain: Chain) -> str:
    configured: str = settings.FLEETOPS_INDEXER_DECODER_URL
    if configured:
        return configured
    source = chain.sources.filter(enabled=True).order_by("priority", "name").first()
    if source is None:
        raise ValidationFailed(NO_DECODER_URL)
    return source.rpc_url


def decoder_for(chain: Chain) -> DecoderClient:
    """A new client for the chain's decoder (the caller closes it)."""
    return DecoderClient(
        decoder_url_for(chain),
        timeout=float(settings.FLEETOPS_INDEXER_DECODER_TIMEOUT_SECONDS),
        name=chain.slug,
    )


def enrichment_round(
    *, chain: Chain, decoder: DecoderClient, limit: int = 200, concurrency: int = 4
) -> dict[str, int]:
    """`enrichment_run_once` plus the loop's heartbeat; a failing round is logged, counted and
    reported (`error` = 1), never raised, so the loop keeps going."""
    started = time.monotonic()
    DECODE_CONCURRENCY.labels(chain=chain.slug).set(concurrency)
    try:
        counts = enrichment_run_once(chain=chain, decoder=decoder, limit=limit, concurrency=concurrency)
    except DatabaseError as exc:
        log.exception("enrichment round for %s failed", chain.slug)
        ENRICHMENT_ROUND_FAILURES.labels(chain=chain.slug).inc()
        # A broken connection must not poison every later round of a long-running loop.
        connection.close_if_unusable_or_obsolete()
        try:
            heartbeat_beat(
                name=f"indexer.enrich.{chain.slug}",
                ok=False,
                duration=time.monotonic() - started,
                error=repr(exc),
            )
        except DatabaseError:
            connection.close_if_unusable_or_obsolete()
        return {**dict.fromkeys(OUTCOMES, 0), "error": 1}
    heartbeat_beat(
        name=f"indexer.enrich.{chain.slug}",
        ok=True,
        duration=time.monotonic() - started,
        details={k: v for k, v in counts.items() if v},
    )
    return counts


LOOP_BACKOFF_CAP_SECONDS = 30.0


def enrichment_loop(
    *,
    chain: Chain,
    stop: threading.Event,
    decoder_factory: Callable[[], DecoderClient],
    poll: float = 1.0,
    on_round: Callable[[dict[str, int]], None] | None = None,
    limit: int | None = None,
    concurrency: int | None = None,
) -> None:
    """Run rounds until `stop` is set: back to back while rounds come back full, `poll` apart
    otherwise. Pausing enrichment on the chain (`enrichment_enabled`) is honoured every round, and so
    are its batch size and decode concurrency (`enrichment_batch_size`, `decode_concurrency`, read in
    the same query) unless `limit` / `concurrency` pin them."""
    decoder = decoder_factory()
    failures = 0
    try:
        while not stop.is_set():
            try:
                chain.refresh_from_db(
                    fields=["enrichment_enabled", "enrichment_batch_size", "decode_concurrency"]
                )
                if not chain.enrichment_enabled:
                    stop.wait(poll)
                    continue
                batch = limit or chain.enrichment_batch_size
                counts = enrichment_round(
                    chain=chain,
                    decoder=decoder,
                    limit=batch,
                    concurrency=concurrency or chain.decode_concurrency,
                )
            except DatabaseError:
                # The database went away (a restart, a failover): drop the broken connection and
                # try again with backoff. The thread must outlive the outage: nothing else would
                # restart it while ingest, on its own thread, carries on.
                failures += 1
                ENRICHMENT_ROUND_FAILURES.labels(chain=chain.slug).inc()
                if failures == 1:
                    log.warning("enrichment paused: database unavailable", extra={"chain": chain.slug})
                connection.close()
                stop.wait(backoff_delay(failures, base=poll, cap=LOOP_BACKOFF_CAP_SECONDS))
                continue
            if failures:
                log.info("enrichment resumed", extra={"chain": chain.slug, "failed_rounds": failures})
                failures = 0
            if on_round is not None:
                on_round(counts)
            if counts["claimed"] < batch or counts.get("error"):
                stop.wait(poll)
    finally:
        decoder.close()


_shared: dict[str, DecoderClient] = {}
_shared_lock = threading.Lock()


def shared_decoder(chain: Chain) -> DecoderClient:
    """One client per decoder URL per process, so a Celery worker's breaker outlives a single task."""
    url = decoder_url_for(chain)
    with _shared_lock:
        if url not in _shared:
            _shared[url] = DecoderClient(
                url, timeout=float(settings.FLEETOPS_INDEXER_DECODER_TIMEOUT_SECONDS), name=chain.slug
            )
        return _shared[url]


def enrichment_tick(
    *, limit: int | None = None, concurrency: int | None = None, budget_seconds: float = TICK_BUDGET_SECONDS
) -> dict[str, dict[str, int]]:
    """Short enrichment work for every chain with enrichment on (the beat task), with each chain's
    `enrichment_batch_size` and `decode_concurrency` unless `limit` / `concurrency` pin them. Rounds
    repeat while they come back full, within `budget_seconds` per chain. Safe to run twice at once."""
    totals: dict[str, dict[str, int]] = {}
    for chain in Chain.objects.filter(enrichment_enabled=True).order_by("slug"):
        try:
            decoder = shared_decoder(chain)
        except ValidationFailed:
            log.warning("enrichment for %s skipped: %s", chain.slug, NO_DECODER_URL)
            continue
        total = dict.fromkeys(OUTCOMES, 0)
        deadline = time.monotonic() + budget_seconds
        batch = limit or chain.enrichment_batch_size
        while True:
            counts = enrichment_round(
                chain=chain, decoder=decoder, limit=batch, concurrency=concurrency or chain.decode_concurrency
            )
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
            if counts["claimed"] < batch or counts.get("error") or time.monotonic() >= deadline:
                break
        totals[chain.slug] = total
    return totals
