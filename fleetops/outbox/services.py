"""The transactional outbox: every kick through the broker (a Celery task a request asks for) goes
through here, so a request that was accepted is carried out even when the broker was down at the
time (DESIGN.md rule 15, "accepted means done").

1. `outbox_enqueue(task=..., kwargs=...)` writes the message inside the caller's transaction (it
   refuses to run outside one, like `fleetops.audit.services.record`): the request's change, its
   audit row and its message commit or roll back together.
2. After that commit the message is sent at once (`current_app.send_task`) and marked `sent`
   through the transition kernel when the broker took it. A broker error is counted
   (`fleetops_outbox_send_failures_total`), logged once, and leaves the message `pending` with a
   backoff; the request has succeeded all the same.
3. `outbox_relay()` (the beat's `outbox.relay`, every 10 s) claims due pending messages with
   `SELECT … FOR UPDATE SKIP LOCKED` in a short transaction (pending -> pending: attempts + 1,
   `available_at` pushed out by a lease), sends them outside any transaction, and records sent or
   retry-later (exponential backoff with full jitter). Two relays never claim the same message; a
   relay that dies mid-send releases its claim when the lease runs out. A pass stops sending at the
   first broker error and releases the rest untried.

At least once, not exactly once: a crash between the broker taking a message and the row being
marked sent (or a send that outlives its lease) sends it again. Every task kicked this way re-reads
state and moves it by compare-and-set (see each task's docstring), so a second delivery finds
nothing left to do or does the same thing again; that is the price of admission to the outbox.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.db import DatabaseError, transaction

from fleetops.lib import clock
from fleetops.lib.atomic import in_transaction
from fleetops.lib.backoff import backoff_delay
from fleetops.lib.transition import transition_rows
from fleetops.observability.context import current_request_id
from fleetops.outbox.metrics import RELAY_DURATION, SEND_FAILURES, SENT
from fleetops.outbox.models import OUTBOX_MACHINE, OutboxMessage, OutboxStatus

log = logging.getLogger(__name__)

IMMEDIATE = "immediate"
RELAY = "relay"
# The relay leaves a new message to its request's on-commit send for this long.
IMMEDIATE_GRACE_SECONDS = 30
# How long a relay's claim holds a message: a relay that died mid-send releases it after this.
CLAIM_LEASE_SECONDS = 60
# Retry after a failed send: exponential from 5 s, capped at a minute, full jitter.
RETRY_BASE_SECONDS = 5.0
RETRY_CAP_SECONDS = 60.0
RELAY_BATCH = 200
# Sent messages are kept this long (to look up what a request queued), then pruned.
SENT_RETENTION_DAYS = 7
PRUNE_BATCH = 5000
OUTSIDE_TRANSACTION = (
    "outbox messages are written inside the transaction of the request that asks for them; "
    "call outbox_enqueue() inside transaction.atomic()"
)


class OutboxOutsideTransaction(RuntimeError):
    """`outbox_enqueue()` was called in autocommit: a message committed apart from its request is
    how a crash leaves a request without its work (or work without its request)."""


@dataclass(frozen=True)
class _Claimed:
    """A message as one sender read it: `attempts` is the value its record must still match, `try_`
    the number of this send (in the Celery task id, `outbox-<id>-<try>`)."""

    pk: int
    task: str
    kwargs: dict[str, Any]
    expires_seconds: int | None
    attempts: int
    try_: int


@dataclass
class RelayResult:
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    untried: int = 0
    error: str = ""


def outbox_enqueue(
    *, task: str, kwargs: Mapping[str, Any] | None = None, expires_seconds: int | None = None
) -> OutboxMessage:
    """Store a message for Celery task `task` (by name) with `kwargs` in the caller's transaction,
    and send it once that transaction commits. `expires_seconds` becomes Celery's `expires`,
    counted from the send. The task must be idempotent (see the module docstring)."""
    if not in_transaction():
        raise OutboxOutsideTransaction(OUTSIDE_TRANSACTION)
    if not task or len(task) > 200:
        raise ValueError(f"outbox: a task name of 1-200 characters, not {task!r}")
    # What the relay will read back is JSON: send exactly that now too (and refuse what is not).
    payload = json.loads(json.dumps(dict(kwargs or {})))
    now = clock.now()
    message = OutboxMessage.objects.create(
        task=task,
        kwargs=payload,
        expires_seconds=expires_seconds,
        created_at=now,
        available_at=now + timedelta(seconds=IMMEDIATE_GRACE_SECONDS),
        request_id=current_request_id()[:64],
    )
    claimed = _Claimed(message.pk, task, payload, expires_seconds, attempts=0, try_=1)
    transaction.on_commit(lambda: _send_now(claimed), robust=True)
    return message


def _publish(message: _Claimed) -> None:
    options: dict[str, Any] = {"task_id": f"outbox-{message.pk}-{message.try_}"}
    if message.expires_seconds is not None:
        options["expires"] = message.expires_seconds
    current_app.send_task(message.task, kwargs=message.kwargs, **options)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _count_failure(message: _Claimed, exc: BaseException, *, path: str) -> None:
    SEND_FAILURES.labels(task=message.task, path=path).inc()
    log.warning(
        "outbox send failed; the message stays pending and is sent later: %s",
        _describe(exc),
        extra={"outbox_message": message.pk, "task": message.task, "path": path},
    )


def _send_now(message: _Claimed) -> None:
    """The on-commit send. Best effort: whatever it leaves pending, the relay sends."""
    try:
        _publish(message)
    except Exception as exc:  # every broker/transport error class; the request succeeded anyway
        _count_failure(message, exc, path=IMMEDIATE)
        _record_now(message, error=_describe(exc))
        return
    SENT.labels(path=IMMEDIATE).inc()
    _record_now(message, error=None)


def _record_now(message: _Claimed, *, error: str | None) -> None:
    try:
        if error is None:
            _mark_sent([message], increment=1)
        else:
            _retry_later([message], error=error, increment=1)
    except DatabaseError:
        # The relay takes it from here (a sent one goes again: harmless, see the module docstring).
        log.warning(
            "outbox message %s but not recorded",
            "sent" if error is None else "not sent",
            exc_info=True,
            extra={"outbox_message": message.pk},
        )


def _mark_sent(messages: Sequence[_Claimed], *, increment: int) -> list[Any]:
    return transition_rows(
        model=OutboxMessage,
        machine=OUTBOX_MACHINE,
        rows=[{"pk": m.pk, "attempts": m.attempts} for m in messages],
        to=OutboxStatus.SENT,
        match=("attempts",),
        updates={"sent_at": clock.now()},
        increments={"attempts": increment} if increment else None,
        operation="outbox_mark_sent",
    )


def _retry_later(
    messages: Sequence[_Claimed], *, error: str | None, increment: int, tries: Iterable[int] | None = None
) -> list[Any]:
    """pending -> pending with a backoff per message (full jitter, by the try number); `error=None`
    keeps the last error (messages released untried)."""
    now = clock.now()
    numbers = list(tries) if tries is not None else [m.attempts + increment for m in messages]
    rows = [
        {
            "pk": m.pk,
            "attempts": m.attempts,
            "available_at": _after_backoff(now, n),
        }
        for m, n in zip(messages, numbers, strict=True)
    ]
    return transition_rows(
        model=OutboxMessage,
        machine=OUTBOX_MACHINE,
        rows=rows,
        to=OutboxStatus.PENDING,
        set_fields=("available_at",),
        match=("attempts",),
        updates={} if error is None else {"last_error": error},
        increments={"attempts": increment} if increment else None,
        operation="outbox_retry_later",
    )


def _after_backoff(now: datetime, attempt: int) -> datetime:
    delay = backoff_delay(max(1, attempt), base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
    return now + timedelta(seconds=delay)


def _claim(limit: int) -> list[_Claimed]:
    """Lock due pending messages (skipping any another relay holds), push them out by the lease and
    count the attempt, in one short transaction."""
    now = clock.now()
    with transaction.atomic():
        due = list(
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(status=OutboxStatus.PENDING, available_at__lte=now)
            .order_by("available_at", "id")
            .values_list("pk", "task", "kwargs", "expires_seconds", "attempts")[:limit]
        )
        if not due:
            return []
        moved = set(
            transition_rows(
                model=OutboxMessage,
                machine=OUTBOX_MACHINE,
                rows=[{"pk": pk, "attempts": attempts} for pk, _, _, _, attempts in due],
                to=OutboxStatus.PENDING,
                match=("attempts",),
                updates={"available_at": now + timedelta(seconds=CLAIM_LEASE_SECONDS)},
                increments={"attempts": 1},
                operation="outbox_claim",
            )
        )
    return [
        _Claimed(pk, task, kwargs, expires, attempts=attempts + 1, try_=attempts + 1)
        for pk, task, kwargs, expires, attempts in due
        if pk in moved
    ]


def outbox_relay(*, limit: int = RELAY_BATCH) -> RelayResult:
    """Send up to `limit` due pending messages (see the module docstring). Any number of relays may
    run at once: each message is claimed by one of them."""
    started = time.monotonic()
    result = RelayResult()
    claimed = _claim(limit)
    result.claimed = len(claimed)
    sent: list[_Claimed] = []
    failed: list[_Claimed] = []
    untried: list[_Claimed] = []
    for message in claimed:
        if result.error:
            untried.append(message)
            continue
        try:
            _publish(message)
        except Exception as exc:  # the broker refused: this one waits its backoff, the rest go back
            result.error = _describe(exc)
            _count_failure(message, exc, path=RELAY)
            failed.append(message)
        else:
            sent.append(message)
    if sent:
        SENT.labels(path=RELAY).inc(len(sent))
        result.sent = len(_mark_sent(sent, increment=0))
    if failed:
        result.failed = len(_retry_later(failed, error=result.error, increment=0))
    if untried:
        # Not tried this pass: the claim's attempt is given back, and they are due again soon.
        result.untried = len(_retry_later(untried, error=None, increment=-1, tries=[1] * len(untried)))
    RELAY_DURATION.observe(time.monotonic() - started)
    return result


def outbox_prune(*, older_than_days: int = SENT_RETENTION_DAYS) -> int:
    """Delete sent messages older than `older_than_days`, in short batches. Pending ones are never
    pruned, however old."""
    cutoff = clock.now() - timedelta(days=older_than_days)
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(
                OutboxMessage.objects.filter(status=OutboxStatus.SENT, sent_at__lt=cutoff)
                .order_by("id")
                .values_list("pk", flat=True)[:PRUNE_BATCH]
            )
            if ids:
                deleted += OutboxMessage.objects.filter(pk__in=ids, status=OutboxStatus.SENT).delete()[0]
        if len(ids) < PRUNE_BATCH:
            return deleted
