"""Every platform metric, declared once. Domain apps declare theirs in their own `metrics.py`.

Names follow `fleetops_<area>_<thing>_<unit>`. In multi-process mode (PROMETHEUS_MULTIPROC_DIR set,
as under gunicorn and Celery prefork) counters and histograms are written to per-process files and
summed at scrape; gauges that describe database state are computed at scrape time instead (see
`collectors.py`) so they never disagree between processes.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RACE_LOST = Counter(
    "fleetops_platform_race_lost_total",
    "Compare-and-set updates that found the row already moved by someone else.",
    ["operation"],
)
API_ERRORS = Counter(
    "fleetops_api_errors_total",
    "API responses in the error shape, by HTTP status and error code.",
    ["status", "code"],
)
IDEMPOTENCY_OUTCOMES = Counter(
    "fleetops_api_idempotency_requests_total",
    "Requests carrying an Idempotency-Key, by outcome (new, replayed, in_flight, mismatch, takeover).",
    ["outcome"],
)
TRANSITIONS = Counter(
    "fleetops_platform_transitions_total",
    "State changes made through the transition kernel, by machine and target state.",
    ["machine", "to"],
)
ACCESS_DENIED = Counter(
    "fleetops_access_denied_total",
    "Authenticated requests or admin actions refused for lack of role.",
    ["surface"],
)
LOGIN_FAILURES = Counter(
    "fleetops_access_login_failures_total",
    "Failed interactive logins (including locked-out attempts).",
)
FAILED_AUTH = Counter(
    "fleetops_access_failed_auth_total",
    "API requests refused at token authentication, by outcome (invalid, revoked, expired, "
    "owner_inactive; throttled: refused unchecked because the address failed too often).",
    ["outcome"],
)
AUDIT_EVENTS = Counter(
    "fleetops_audit_events_total",
    "Audit rows written, by actor type.",
    ["actor_type"],
)
CELERY_TASKS = Counter(
    "fleetops_celery_tasks_total",
    "Celery task executions by task name and final state.",
    ["task", "state"],
)
CELERY_TASK_DURATION = Histogram(
    "fleetops_celery_task_duration_seconds",
    "Celery task run time by task name.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
LEASE_EVENTS = Counter(
    "fleetops_platform_lease_events_total",
    "Leader lease operations by lease name and outcome (acquired, renewed, lost, released, refused).",
    ["lease", "outcome"],
)
