"""Outbox metrics, declared once. The backlog gauges are computed from the database at scrape time,
so every process reports the same value."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

SEND_FAILURES = Counter(
    "fleetops_outbox_send_failures_total",
    "Outbox sends the broker refused, by task and path (immediate: after the request's commit; "
    "relay: the beat's pass). The message stays pending and is sent later.",
    ["task", "path"],
)
SENT = Counter(
    "fleetops_outbox_sent_total",
    "Outbox messages the broker took, by path (immediate or relay).",
    ["path"],
)
RELAY_DURATION = Histogram(
    "fleetops_outbox_relay_duration_seconds",
    "Run time of one relay pass (claim, send, record).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def collect_backlog() -> Iterable[Metric]:
    from fleetops.outbox.selectors import outbox_backlog

    backlog = outbox_backlog()
    pending = GaugeMetricFamily(
        "fleetops_outbox_pending_messages", "Outbox messages not yet taken by the broker."
    )
    pending.add_metric([], backlog.pending)
    yield pending
    oldest = GaugeMetricFamily(
        "fleetops_outbox_oldest_pending_age_seconds",
        "Age of the oldest pending outbox message (0 when none): how long accepted work has waited "
        "for the broker.",
    )
    oldest.add_metric([], backlog.oldest_age_seconds)
    yield oldest
