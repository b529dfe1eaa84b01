"""Curtailment metrics, declared once. State gauges are computed from the database at scrape."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

CANDIDATES_EXCLUDED = Counter(
    "fleetops_curtailment_candidates_excluded_total",
    "Devices the selector skipped at start, by skip reason.",
    ["reason"],
)
MAINTENANCE_OVERRIDES = Counter(
    "fleetops_curtailment_maintenance_overrides_total",
    "Events started with force_include_maintenance.",
)
EVENTS_STARTED = Counter(
    "fleetops_curtailment_events_started_total",
    "Events created by start (replays not counted).",
)
START_REPLAYS = Counter(
    "fleetops_curtailment_start_replays_total",
    "Starts answered with an existing live event (idempotency key, external reference or race loser).",
)


def collect_states() -> Iterable[Metric]:
    from django.db.models import Count

    from curtailment.models import EVENT_NON_TERMINAL, CurtailmentEvent, CurtailmentTarget

    events = GaugeMetricFamily(
        "fleetops_curtailment_events", "Curtailment events by state (live states only).", labels=["state"]
    )
    live = dict(
        CurtailmentEvent.objects.filter(state__in=EVENT_NON_TERMINAL)
        .values_list("state")
        .annotate(n=Count("id"))
        .values_list("state", "n")
    )
    for state in EVENT_NON_TERMINAL:
        events.add_metric([state], live.get(state, 0))
    yield events
    targets = GaugeMetricFamily(
        "fleetops_curtailment_targets",
        "Targets of live events by state and desired state.",
        labels=["state", "desired_state"],
    )
    rows = (
        CurtailmentTarget.objects.filter(event__state__in=EVENT_NON_TERMINAL)
        .values_list("state", "desired_state")
        .annotate(n=Count("id"))
        .values_list("state", "desired_state", "n")
    )
    for target_state, desired, n in rows:
        targets.add_metric([target_state, desired], n)
    yield targets
