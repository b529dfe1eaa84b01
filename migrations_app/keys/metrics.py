"""Key re-stake metrics, declared once. Per-status gauges are computed from the database at scrape."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

ATTEMPTS = Counter(
    "fleetops_keys_attempts_total",
    "Re-stake attempts by result: claimed, succeeded, retrying, failed, superseded, recovered.",
    ["result"],
)
BROADCASTS = Counter(
    "fleetops_keys_broadcasts_total",
    "Stake tx broadcasts by result: sent, rejected (CheckTx), unknown (transport error: looked up by "
    "hash); the one re-send of a tx missing on chain: resend_accepted, resend_rejected, resend_unknown.",
    ["result"],
)
LOOKUPS = Counter(
    "fleetops_keys_tx_lookups_total",
    "Hash lookups of stake txs whose broadcast outcome was lost: found, missing, unavailable.",
    ["result"],
)
VERIFICATIONS = Counter(
    "fleetops_keys_verification_results_total",
    "Verification outcomes per pending transaction and pass: confirmed, absent, unavailable, expired.",
    ["kind"],
)
UNVERIFIABLE = Counter(
    "fleetops_keys_verification_unverifiable_total",
    "Transactions reaching another multiple of 50 unavailable verification checks (logged critical).",
)
SCHEDULE_DURATION = Histogram(
    "fleetops_keys_schedule_duration_seconds",
    "Run time of one re-stake or verification pass.",
    ["loop"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SCHEDULE_FAILURES = Counter(
    "fleetops_keys_schedule_failures_total",
    "Re-stake or verification passes that raised.",
    ["loop"],
)
OPERATIONS = Counter(
    "fleetops_keys_operations_total",
    "Key service calls by operation (migrate, retry, auto_reset) and outcome.",
    ["operation", "outcome"],
)


def collect_states() -> Iterable[Metric]:
    from django.db.models import Count, Max, Min

    from fleetops.lib import clock
    from migrations_app.models.keys import (
        KEY_MIGRATION_DUE,
        STAKE_TX_PENDING,
        Key,
        KeyMigrationStatus,
        StakeTransaction,
    )

    by_status = GaugeMetricFamily(
        "fleetops_keys_by_migration_status", "Keys by migration status.", labels=["status"]
    )
    counts = dict(
        Key.objects.values_list("migration_status")
        .annotate(n=Count("id"))
        .values_list("migration_status", "n")
    )
    for status in KeyMigrationStatus.values:
        by_status.add_metric([status], counts.get(status, 0))
    yield by_status
    failed = GaugeMetricFamily("fleetops_keys_failed", "Keys whose re-stake exhausted its attempts.")
    failed.add_metric([], counts.get(KeyMigrationStatus.FAILED, 0))
    yield failed
    oldest = GaugeMetricFamily(
        "fleetops_keys_oldest_scheduled_age_seconds",
        "Age of the oldest key still scheduled or retrying, from the start of its round (0 when none).",
    )
    first = Key.objects.filter(migration_status__in=KEY_MIGRATION_DUE).aggregate(
        at=Min("migration_scheduled_at")
    )["at"]
    oldest.add_metric([], max(0.0, (clock.now() - first).total_seconds()) if first else 0.0)
    yield oldest
    pending = StakeTransaction.objects.filter(status=STAKE_TX_PENDING).aggregate(
        n=Count("id"), streak=Max("unavailable_checks")
    )
    txs = GaugeMetricFamily("fleetops_keys_pending_transactions", "Stake transactions awaiting a verdict.")
    txs.add_metric([], pending["n"] or 0)
    yield txs
    streak = GaugeMetricFamily(
        "fleetops_keys_verification_unavailable_streak_max",
        "Highest count of consecutive unavailable verification checks among pending transactions.",
    )
    streak.add_metric([], pending["streak"] or 0)
    yield streak
