"""Notification metrics, declared once."""

from __future__ import annotations

from prometheus_client import Counter

DELIVERIES = Counter(
    "fleetops_notifications_deliveries_total",
    "Notification send attempts by channel kind and outcome (sent, retry, error).",
    ["kind", "outcome"],
)
