"""Curtailment metrics, declared once. State gauges are computed from the database at scrape."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from fleetops.lib.errors import DomainError

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


GATEWAY_REQUESTS = Counter(
    "fleetops_curtailment_gateway_requests_total",
    "Fleet gateway requests by operation and result (ok, unreachable, http_<status>).",
    ["operation", "result"],
)

TICK_DURATION = Histogram(
    "fleetops_curtailment_tick_duration_seconds",
    "Reconciler tick run time.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
TICK_FAILURES = Counter(
    "fleetops_curtailment_tick_failures_total",
    "Reconciler failures: the live-event listing failed, or one event's processing raised.",
)
COMMANDS = Counter(
    "fleetops_curtailment_commands_total",
    "Devices in gateway commands by kind and result (dispatched, skipped, error, no_batch, not_enqueued).",
    ["kind", "result"],
)
TARGET_WRITE_FAILURES = Counter(
    "fleetops_curtailment_target_write_failures_total",
    "Target writes that failed for a reason other than a lost race.",
)

OPERATIONS = Counter(
    "fleetops_curtailment_operations_total",
    "Curtailment service calls by operation (start, update, stop, terminate) and outcome.",
    ["operation", "outcome"],
)


F = TypeVar("F", bound=Callable[..., Any])


def counted(operation: str) -> Callable[[F], F]:
    """Count every call of a service in `OPERATIONS` by outcome: ok, or the error code it raised."""

    def decorator(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except DomainError as exc:
                OPERATIONS.labels(operation=operation, outcome=exc.code).inc()
                raise
            OPERATIONS.labels(operation=operation, outcome="ok").inc()
            return result

        return wrapper  # type: ignore[return-value]

    return decorator
