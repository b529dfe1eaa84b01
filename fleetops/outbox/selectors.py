"""Reads of the outbox: the backlog (scrape-time gauges, /ops/status)."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Min

from fleetops.lib import clock
from fleetops.observability.registry import CheckResult
from fleetops.outbox.models import OutboxMessage, OutboxStatus

# The alert's threshold too (deploy/prometheus/platform.rules.yml, FleetOpsOutboxBacklog).
BACKLOG_WARN_SECONDS = 600


@dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_age_seconds: float


def outbox_backlog() -> Backlog:
    """How many messages wait for the broker, and for how long the oldest has (by `created_at`:
    since its request was accepted). One aggregate over the partial index of pending rows."""
    row = OutboxMessage.objects.filter(status=OutboxStatus.PENDING).aggregate(
        n=Count("id"), oldest=Min("created_at")
    )
    oldest = row["oldest"]
    age = max(0.0, (clock.now() - oldest).total_seconds()) if oldest is not None else 0.0
    return Backlog(pending=int(row["n"]), oldest_age_seconds=age)


def check_outbox() -> CheckResult:
    """/ops/status: the backlog, and the last errors of the oldest pending messages."""
    backlog = outbox_backlog()
    rows = [
        {
            "message": m["id"],
            "task": m["task"],
            "attempts": m["attempts"],
            "next try": m["available_at"].isoformat(),
            "last error": m["last_error"][:200],
        }
        for m in OutboxMessage.objects.filter(status=OutboxStatus.PENDING)
        .order_by("available_at", "id")
        .values("id", "task", "attempts", "available_at", "last_error")[:10]
    ]
    late = backlog.oldest_age_seconds > BACKLOG_WARN_SECONDS
    summary = (
        f"{backlog.pending} pending, oldest {backlog.oldest_age_seconds:.0f}s"
        if backlog.pending
        else "nothing pending"
    )
    return CheckResult("warn" if late else "ok", summary, rows)
