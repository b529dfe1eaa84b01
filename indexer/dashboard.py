"""The indexer on the ops dashboard (one block per chain) and its /ops/status check."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.http import HttpRequest

from fleetops.access.selectors import org_ids_for_user
from fleetops.lib import clock
from fleetops.observability.history import trend_series
from fleetops.observability.registry import CheckResult, DashboardCard, Sample, Status, Trend
from fleetops.observability.trends import trend, user_org_ids
from indexer.models import Mode
from indexer.selectors import chain_statuses, chains_visible, enrichment_backlog_by_org, lag_trends

# A lag above this many blocks (outside catch-up) makes the status check warn.
LAG_WARN_BLOCKS = 100


def card_context(request: HttpRequest) -> dict[str, Any]:
    org_ids = None if request.user.is_superuser else org_ids_for_user(request.user)
    return {"chains": chain_statuses(chains_visible(org_ids=org_ids))}


ENRICHMENT_BACKLOG_SERIES = "indexer.enrichment_backlog"
TREND_BUCKET_SECONDS = 1800


def sample_enrichment_backlog() -> list[Sample]:
    return [(ENRICHMENT_BACKLOG_SERIES, org_id, float(n)) for org_id, n in enrichment_backlog_by_org()]


def card_trends(request: HttpRequest) -> list[Trend]:
    """Worst lag per half hour of each chain (up to five) from the writer's lag samples, and the
    enrichment backlog from the sampled history, both over the last day."""
    org_ids = user_org_ids(request)
    chains = list(chains_visible(org_ids=org_ids)[:5])
    since = clock.now() - timedelta(hours=24)
    lags = lag_trends(chains=chains, since=since, bucket_seconds=TREND_BUCKET_SECONDS)
    trends = [
        trend(f"lag-{c.slug}", f"{c.slug} lag (blocks), 24 h", [[float(v) for v in lags[c.pk]]])
        for c in chains
    ]
    backlog = trend_series(series=[ENRICHMENT_BACKLOG_SERIES], org_ids=org_ids)[ENRICHMENT_BACKLOG_SERIES]
    trends.append(trend("enrichment-backlog", "enrichment backlog, 24 h", [backlog]))
    return trends


CARD = DashboardCard(
    key="indexer",
    title="Indexer",
    template="indexer/card.html",
    context=card_context,
    order=20,
    trends=card_trends,
)


def check_chains() -> CheckResult:
    """fail: a chain halted (identity mismatch, reorg deeper than finality) or nobody holds its
    writer lease; warn: degraded (poison height, stalled indexer), paused, lagging, a source
    dead / connected degraded (partial data), or a source refused (DNS, TLS, protocol) until an
    operator re-enables it. A chain that stopped producing blocks (idle) is reported, not
    failed: the indexer is doing the right thing."""
    statuses = chain_statuses(chains_visible(org_ids=None))
    overall: Status = "ok"
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for s in statuses:
        status: Status = "ok"
        notes: list[str] = []
        if s.mode == Mode.HALTED:
            status = "fail"
            notes.append(f"halted: {s.last_error[:120]}")
        if s.leader is None or not s.leader.live:
            status = "fail"
            notes.append("no live writer lease")
        if s.mode == Mode.DEGRADED:
            status = _worst(status, "warn")
            notes.append(f"degraded: {s.last_error[:120]}" if s.last_error else "degraded")
        if s.paused:
            status = _worst(status, "warn")
            notes.append("paused")
        if s.mode == Mode.NORMAL and (s.lag_blocks or 0) > LAG_WARN_BLOCKS:
            status = _worst(status, "warn")
            notes.append(f"lag {s.lag_blocks} blocks")
        bad_sources = [
            x.name for x in s.sources if x.health_name == "dead" or x.status_name == "connected_degraded"
        ]
        if bad_sources:
            status = _worst(status, "warn")
            notes.append(f"sources dead or degraded: {', '.join(bad_sources)}")
        refused = s.refused_sources
        if refused:
            status = _worst(status, "warn")
            notes.append(
                "sources refused until re-enabled: "
                + ", ".join(f"{x.name} ({x.refused_reason[:80]})" for x in refused)
            )
        if s.stalled:
            notes.append("chain stalled (head flat)")
        overall = _worst(overall, status)
        if status != "ok":
            problems.append(s.slug)
        rows.append(
            {
                "chain": s.slug,
                "mode": s.mode + (" (paused)" if s.paused else ""),
                "head": s.head_height,
                "indexed": s.last_indexed_height,
                "lag": s.lag_blocks,
                "leader": s.leader.holder if s.leader and s.leader.live else "none",
                "status": status,
                "notes": "; ".join(notes),
            }
        )
    if not statuses:
        return CheckResult("ok", "no chains configured")
    summary = f"{len(statuses)} chains" + (
        f"; attention: {', '.join(problems)}" if problems else ", all indexing"
    )
    return CheckResult(overall, summary, rows)


_RANK = {"ok": 0, "warn": 1, "fail": 2}


def _worst(a: Status, b: Status) -> Status:
    return a if _RANK[a] >= _RANK[b] else b
