from __future__ import annotations

from django.db import models


class Heartbeat(models.Model):
    """The last sign of life of one loop (a reconciler tick, a schedule pass, an indexer writer).

    Every loop upserts its row once per iteration, whether the iteration succeeded or not;
    `last_success_at` only moves on success, so "alive but failing" and "dead" read differently.
    Ages are exported at scrape time as `fleetops_platform_heartbeat_age_seconds{name}`.
    """

    name = models.CharField(max_length=120, unique=True)
    last_beat_at = models.DateTimeField()
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_duration_seconds = models.FloatField(default=0)
    last_error = models.TextField(blank=True, default="")
    beats = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Lease(models.Model):
    """A Postgres-backed leader lease for singletons (one indexer writer per chain, ...).

    `token` is a fencing token: it grows by one every time the lease changes hands. A holder puts
    its token into every write transaction (`lease_assert_held`) so a paused ex-leader whose lease
    was taken over cannot commit after the new leader started.
    """

    name = models.CharField(max_length=120, unique=True)
    holder = models.CharField(max_length=200)
    token = models.BigIntegerField()
    acquired_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["name"]
        constraints = [models.CheckConstraint(condition=models.Q(token__gte=1), name="lease_token_positive")]

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} (token {self.token})"


class MetricSample(models.Model):
    """One sampled value of a dashboard series ("keys.failed", "curtailment.live_events") for one
    organization (None: not per organization), written every few minutes by the platform tick from
    the samplers apps register, and pruned after a day: the history behind the cards' sparklines
    for series that have no history table of their own. Bounded: series x organizations x 288."""

    series = models.CharField(max_length=80)
    org_id = models.BigIntegerField(null=True, blank=True)
    at = models.DateTimeField()
    value = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["series", "at"], name="metricsample_series_at")]

    def __str__(self) -> str:
        return f"{self.series} {self.at:%H:%M} {self.value}"
