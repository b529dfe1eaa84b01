"""Sampled history for dashboard sparklines (`MetricSample`).

1. The platform tick (`worker_heartbeat`, every 30 s) calls `history_sample()`.
2. Under a transaction-scoped advisory lock (two workers never sample the same minute twice), it
   returns at once unless the newest sample is older than `SAMPLE_EVERY`.
3. It runs every registered sampler, inserts their rows with one shared timestamp, and deletes rows
   older than `RETENTION`: the table holds at most series x organizations x 24 h / 5 min rows.
A sampler that raises is logged and skipped; the others still record.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Max, Q, Sum

from fleetops.lib import clock
from fleetops.observability import registry
from fleetops.observability.models import MetricSample

log = logging.getLogger(__name__)

SAMPLE_EVERY = timedelta(minutes=5)
RETENTION = timedelta(hours=25)
TREND_WINDOW = timedelta(hours=24)
TICK = "_tick"
# pg_advisory_xact_lock key: "fo-hist" in ASCII.
_LOCK_KEY = 0x666F2D68697374


def history_sample(*, now: datetime | None = None) -> int:
    """Record one sample per series if one is due; the number of rows written."""
    now = now or clock.now()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_LOCK_KEY])
            row = cursor.fetchone()
        if not row or not row[0]:
            return 0
        newest = MetricSample.objects.aggregate(at=Max("at"))["at"]
        if newest is not None and now - newest < SAMPLE_EVERY - timedelta(seconds=5):
            return 0
        # The tick row marks every sampling instant, so a series that was zero everywhere is a 0.
        rows: list[MetricSample] = [MetricSample(series=TICK, org_id=None, at=now, value=1.0)]
        for name, sample in registry.samplers().items():
            try:
                with transaction.atomic():
                    rows += [
                        MetricSample(series=series, org_id=org_id, at=now, value=float(value))
                        for series, org_id, value in sample()
                    ]
            except Exception:
                log.exception("history sampler %s failed", name)
        MetricSample.objects.bulk_create(rows, batch_size=1000)
        MetricSample.objects.filter(at__lt=now - RETENTION).delete()
    return len(rows) - 1


def trend_series(
    *, series: Iterable[str], org_ids: Iterable[int] | None, now: datetime | None = None
) -> dict[str, list[float]]:
    """The last day of each series, summed over `org_ids` (None: every organization), oldest first.
    One indexed query (`metricsample_series_at`)."""
    now = now or clock.now()
    names = list(series)
    rows = MetricSample.objects.filter(series__in=[*names, TICK], at__gte=now - TREND_WINDOW)
    if org_ids is not None:
        rows = rows.filter(Q(org_id__in=list(org_ids)) | Q(org_id__isnull=True))
    by_at: dict[str, dict[datetime, float]] = defaultdict(dict)
    for name, at, value in (
        rows.values("series", "at").annotate(v=Sum("value")).order_by("at").values_list("series", "at", "v")
    ):
        by_at[name][at] = float(value or 0.0)
    stamps = sorted({at for points in by_at.values() for at in points})
    # A series absent at a sampled instant had no rows for these organizations: zero, not a gap.
    return {name: [by_at[name].get(at, 0.0) for at in stamps] for name in names}
