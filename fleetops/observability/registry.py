"""Extension points domain apps fill in from `AppConfig.ready()`.

`fleetops` never imports a domain app; each app registers its dashboard card, its /ops/status
checks, its readiness checks and its scrape-time metric collectors here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from django.http import HttpRequest
from prometheus_client.metrics_core import Metric

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    status: Status
    summary: str
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Trend:
    """A sparkline under a card's title: `svg` from `fleetops.lib.charts.sparkline`, `caption` says
    what it shows ("lag, 24 h")."""

    key: str
    caption: str
    svg: str


@dataclass(frozen=True)
class DashboardCard:
    key: str
    title: str
    template: str
    context: Callable[[HttpRequest], dict[str, Any]]
    order: int = 100
    # Sparklines drawn above the card's body (bounded reads: a day of samples at most).
    trends: Callable[[HttpRequest], list[Trend]] | None = None


_cards: dict[str, DashboardCard] = {}
_status_checks: dict[str, Callable[[], CheckResult]] = {}
_readiness_checks: dict[str, Callable[[], str | None]] = {}
_collectors: dict[str, Callable[[], Iterable[Metric]]] = {}
# (series, org id or None, value) rows sampled into `MetricSample` by the platform tick.
Sample = tuple[str, int | None, float]
_samplers: dict[str, Callable[[], Iterable[Sample]]] = {}


def register_card(card: DashboardCard) -> None:
    _cards[card.key] = card


def cards() -> list[DashboardCard]:
    return sorted(_cards.values(), key=lambda c: (c.order, c.key))


def register_status_check(name: str, check: Callable[[], CheckResult]) -> None:
    _status_checks[name] = check


def status_checks() -> dict[str, Callable[[], CheckResult]]:
    return dict(_status_checks)


def register_readiness_check(name: str, check: Callable[[], str | None]) -> None:
    """`check` returns None when ready, else a short reason; /health/ready answers 503 with it."""
    _readiness_checks[name] = check


def readiness_checks() -> dict[str, Callable[[], str | None]]:
    return dict(_readiness_checks)


def register_collector(name: str, collect: Callable[[], Iterable[Metric]]) -> None:
    """A function run at scrape time that yields metric families computed from the database."""
    _collectors[name] = collect


def collectors() -> dict[str, Callable[[], Iterable[Metric]]]:
    return dict(_collectors)


def register_sampler(name: str, sample: Callable[[], Iterable[Sample]]) -> None:
    """A cheap function whose values are stored every few minutes as history for sparklines (only
    for series with no history table of their own)."""
    _samplers[name] = sample


def samplers() -> dict[str, Callable[[], Iterable[Sample]]]:
    return dict(_samplers)
