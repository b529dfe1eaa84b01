"""Protocol migrations on the ops dashboard and their /ops/status check."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from fleetops.access.selectors import org_ids_for_user
from fleetops.observability.registry import CheckResult, DashboardCard, Status
from migrations_app.models import MigrationStatus
from migrations_app.protocols.selectors import protocol_statuses, protocols_visible

# A protocol in progress further than this behind the indexed height makes the check warn.
LAG_WARN_BLOCKS = 10_000


def card_context(request: HttpRequest) -> dict[str, Any]:
    org_ids = None if request.user.is_superuser else org_ids_for_user(request.user)
    return {"protocols": protocol_statuses(protocols_visible(org_ids=org_ids)[:20])}


CARD = DashboardCard(
    key="protocols",
    title="Protocol migrations",
    template="admin/migrations_app/protocol/card.html",
    context=card_context,
    order=40,
)


def check_protocols() -> CheckResult:
    """fail: a classification or migration failed; warn: a migration in progress far behind."""
    statuses = protocol_statuses(protocols_visible(org_ids=None))
    if not statuses:
        return CheckResult("ok", "no protocols set up")
    overall: Status = "ok"
    rows = []
    for s in statuses:
        status: Status = "ok"
        notes = []
        for label, value in (
            ("classification", s.classification_status),
            ("history", s.history.status),
            ("current state", s.current_state.status),
        ):
            if value == MigrationStatus.FAILED:
                status = "fail"
                notes.append(f"{label} failed")
        if s.history.status == MigrationStatus.IN_PROGRESS and (s.history.lag_blocks or 0) > LAG_WARN_BLOCKS:
            status = "warn" if status == "ok" else status
            notes.append(f"history lag {s.history.lag_blocks}")
        if status == "fail" or (status == "warn" and overall == "ok"):
            overall = status
        rows.append(
            {
                "protocol": s.protocol.protocol_id,
                "chain": s.chain_slug,
                "classification": s.classification_status,
                "history": s.history.status,
                "history_cursor": s.history.cursor,
                "current_state": s.current_state.status,
                "status": status,
                "notes": "; ".join(notes),
            }
        )
    return CheckResult(overall, f"{len(statuses)} protocols", rows)
