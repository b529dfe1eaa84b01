from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.crypto import constant_time_compare
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fleetops.observability import registry

log = logging.getLogger(__name__)
_migrations_applied = False


@require_GET
@never_cache
def health_live(request: HttpRequest) -> JsonResponse:
    """The process answers HTTP. No I/O: a slow database must not get healthy web nodes killed."""
    return JsonResponse({"status": "ok"})


def _migrations_pending() -> bool:
    global _migrations_applied
    if _migrations_applied:
        return False
    connection = connections[DEFAULT_DB_ALIAS]
    executor = MigrationExecutor(connection)
    pending = bool(executor.migration_plan(executor.loader.graph.leaf_nodes()))
    # Once applied they stay applied for the life of this process; skip the graph walk next time.
    _migrations_applied = not pending
    return pending


@require_GET
@never_cache
def health_ready(request: HttpRequest) -> JsonResponse:
    """Ready to serve: database reachable, migrations applied, and every registered check passes."""
    problems: dict[str, str] = {}
    try:
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute("SELECT 1")
        if _migrations_pending():
            problems["migrations"] = "unapplied migrations"
    except Exception as exc:
        problems["database"] = f"unreachable: {exc.__class__.__name__}"
    if not problems:
        for name, check in registry.readiness_checks().items():
            try:
                reason = check()
            except Exception as exc:
                reason = f"check failed: {exc.__class__.__name__}"
            if reason:
                problems[name] = reason
    if problems:
        return JsonResponse({"status": "unavailable", "problems": problems}, status=503)
    return JsonResponse({"status": "ok"})


def _run_checks() -> list[dict[str, Any]]:
    results = []
    for name, check in registry.status_checks().items():
        started = time.monotonic()
        try:
            result = check()
            status, summary, rows = result.status, result.summary, result.rows
        except Exception as exc:
            log.exception("status check %s failed", name)
            status, summary, rows = "fail", f"check raised {exc.__class__.__name__}: {exc}", []
        results.append(
            {
                "name": name,
                "status": status,
                "summary": summary,
                "rows": rows,
                "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
            }
        )
    return results


@staff_member_required
@never_cache
def ops_status(request: HttpRequest) -> HttpResponse:
    """Staff-only system status: database, broker, beat schedules, heartbeats, queues, domain checks."""
    checks = _run_checks()
    overall = (
        "fail"
        if any(c["status"] == "fail" for c in checks)
        else ("warn" if any(c["status"] == "warn" for c in checks) else "ok")
    )
    # What makes the page not "ok", named at the top: the check and its summary (which says which
    # loop or schedule, and why).
    problems = [{"check": c["name"], "what": c["summary"]} for c in checks if c["status"] != "ok"]
    if request.GET.get("format") == "json" or "application/json" in request.headers.get("Accept", ""):
        return JsonResponse({"status": overall, "problems": problems, "checks": checks})
    return render(
        request,
        "observability/ops_status.html",
        {
            "checks": checks,
            "overall": overall,
            "problems": problems,
            "title": "System status",
            "site_header": "FleetOps",
        },
    )


class _DefaultRegistry(Collector):
    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class _DatabaseCollectors(Collector):
    def collect(self) -> Iterable[Metric]:
        for name, collect in registry.collectors().items():
            try:
                yield from collect()
            except Exception:
                # A broken collector must not take the whole scrape down; its absence alerts.
                log.exception("metrics collector %s failed", name)


@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition. Under several processes (PROMETHEUS_MULTIPROC_DIR) the per-process
    files are merged; database-derived gauges are computed here so every process agrees."""
    expected = settings.FLEETOPS_METRICS_TOKEN
    if expected:
        supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not constant_time_compare(supplied, expected):
            return HttpResponse("metrics token required\n", status=401, content_type="text/plain")
    return HttpResponse(metrics_exposition(), content_type=CONTENT_TYPE_LATEST)


def metrics_exposition() -> bytes:
    """The scrape body, also served by processes with their own port (`indexer_run`)."""
    scrape = CollectorRegistry(auto_describe=False)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(scrape)
    else:
        scrape.register(_DefaultRegistry())
    scrape.register(_DatabaseCollectors())
    return bytes(generate_latest(scrape))
