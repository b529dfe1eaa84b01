"""The transactional outbox: a message is written in the request's transaction or not at all, sent
at once after the commit, left pending (counted, logged once) when the broker refuses, and sent by
the relay later with backoff; relays claim with SKIP LOCKED, so two of them never send one message
twice."""

from __future__ import annotations

import io
import logging
import threading
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from kombu.exceptions import OperationalError

from fleetops import schedules
from fleetops.celery import app
from fleetops.lib import clock
from fleetops.observability.models import Heartbeat
from fleetops.outbox import tasks
from fleetops.outbox.metrics import SEND_FAILURES, SENT, collect_backlog
from fleetops.outbox.models import OutboxMessage, OutboxStatus
from fleetops.outbox.selectors import check_outbox, outbox_backlog
from fleetops.outbox.services import (
    CLAIM_LEASE_SECONDS,
    IMMEDIATE_GRACE_SECONDS,
    OutboxOutsideTransaction,
    outbox_enqueue,
    outbox_prune,
    outbox_relay,
)

TASK = "tests.outbox.kick"
REFUSED = OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def enqueue(**kwargs: Any) -> OutboxMessage:
    with transaction.atomic():
        return outbox_enqueue(task=TASK, **kwargs)


def row(message: OutboxMessage) -> OutboxMessage:
    return OutboxMessage.objects.get(pk=message.pk)


def due_now(n: int, **fields: Any) -> list[OutboxMessage]:
    """Messages the relay may send now (test set-up: rows written directly)."""
    now = clock.now()
    return OutboxMessage.objects.bulk_create(
        [
            OutboxMessage(
                task=TASK,
                kwargs={"n": i},
                created_at=now - timedelta(minutes=1),
                available_at=now - timedelta(seconds=1),
                **fields,
            )
            for i in range(n)
        ]
    )


def broker(side_effect: Any = None) -> Any:
    """Patch the broker publish every sender uses (`current_app.send_task`)."""
    return mock.patch.object(app, "send_task", side_effect=side_effect)


def later(seconds: float) -> Any:
    return clock.frozen(clock.now() + timedelta(seconds=seconds))


# --- enqueue ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_enqueue_refuses_to_run_outside_a_transaction():
    with broker() as send, pytest.raises(OutboxOutsideTransaction, match=r"inside transaction\.atomic"):
        outbox_enqueue(task=TASK, kwargs={"a": 1})
    assert not OutboxMessage.objects.exists()
    assert not send.called


@pytest.mark.django_db
def test_kwargs_that_are_not_json_are_refused_before_anything_is_written():
    with pytest.raises(TypeError), transaction.atomic():
        outbox_enqueue(task=TASK, kwargs={"when": object()})
    with pytest.raises(ValueError, match="task name"), transaction.atomic():
        outbox_enqueue(task="", kwargs={})
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_a_rolled_back_request_leaves_no_message_and_sends_nothing(django_capture_on_commit_callbacks):
    with (
        broker() as send,
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        outbox_enqueue(task=TASK, kwargs={"a": 1})
        assert OutboxMessage.objects.count() == 1  # written in the request's transaction
        raise RuntimeError("the request failed after queueing")
    assert not OutboxMessage.objects.exists()
    assert callbacks == [] and not send.called


@pytest.mark.django_db
def test_the_message_is_sent_once_the_request_commits_and_marked_sent(django_capture_on_commit_callbacks):
    sent_before = SENT.labels(path="immediate")._value.get()
    with broker() as send, django_capture_on_commit_callbacks(execute=True) as callbacks:
        message = enqueue(kwargs={"protocol_ids": ["SEP41"], "n": 1}, expires_seconds=25)
        # Written in the transaction; the send waits for the commit.
        assert row(message).status == OutboxStatus.PENDING and not send.called
    assert len(callbacks) == 1
    send.assert_called_once_with(
        TASK, kwargs={"protocol_ids": ["SEP41"], "n": 1}, expires=25, task_id=f"outbox-{message.pk}-1"
    )
    done = row(message)
    assert done.status == OutboxStatus.SENT and done.attempts == 1 and done.sent_at is not None
    assert done.last_error == ""
    assert SENT.labels(path="immediate")._value.get() == sent_before + 1
    with later(3600), broker() as again:
        assert outbox_relay().claimed == 0  # never sent twice
    assert not again.called


@pytest.mark.django_db
def test_a_broker_error_leaves_the_message_pending_counts_it_and_logs_once(
    django_capture_on_commit_callbacks, caplog
):
    failures = SEND_FAILURES.labels(task=TASK, path="immediate")
    before = failures._value.get()
    with (
        clock.frozen(clock.now()),
        broker(REFUSED),
        caplog.at_level(logging.WARNING, logger="fleetops.outbox"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        message = enqueue(kwargs={"a": 1})  # no exception reaches the request
        now = clock.now()
    waiting = row(message)
    assert waiting.status == OutboxStatus.PENDING and waiting.attempts == 1
    assert waiting.last_error.startswith("OperationalError: Error 111")
    assert now < waiting.available_at <= now + timedelta(seconds=5)  # retry 1: up to 5 s, jittered
    assert failures._value.get() == before + 1
    [logged] = [r for r in caplog.records if r.name == "fleetops.outbox.services"]
    assert logged.levelno == logging.WARNING and "stays pending" in logged.getMessage()


# --- the relay -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_relay_leaves_a_new_message_to_its_on_commit_send_then_sends_it_once(
    django_capture_on_commit_callbacks,
):
    with clock.frozen(clock.now()):
        with django_capture_on_commit_callbacks(execute=False):  # a web process that died at commit
            message = enqueue(kwargs={"a": 1})
        with broker() as send:
            assert outbox_relay().claimed == 0
            clock.advance(timedelta(seconds=IMMEDIATE_GRACE_SECONDS - 1))
            assert outbox_relay().claimed == 0
            clock.advance(timedelta(seconds=2))
            result = outbox_relay()
            assert (result.claimed, result.sent, result.failed, result.error) == (1, 1, 0, "")
            assert outbox_relay().claimed == 0
    send.assert_called_once_with(TASK, kwargs={"a": 1}, task_id=f"outbox-{message.pk}-1")
    done = row(message)
    assert done.status == OutboxStatus.SENT and done.attempts == 1


@pytest.mark.django_db
def test_the_relay_sends_every_due_message_oldest_first_within_its_limit():
    messages = due_now(5)
    with broker() as send:
        assert outbox_relay(limit=3).sent == 3
        assert outbox_relay(limit=3).sent == 2
        assert outbox_relay(limit=3).sent == 0
    assert [c.kwargs["kwargs"]["n"] for c in send.call_args_list] == [0, 1, 2, 3, 4]
    assert {m.status for m in OutboxMessage.objects.filter(pk__in=[m.pk for m in messages])} == {
        OutboxStatus.SENT
    }


@pytest.mark.django_db
def test_the_relay_backs_off_a_refused_message_and_releases_the_rest_untried():
    first, *rest = due_now(3, last_error="earlier")
    failures = SEND_FAILURES.labels(task=TASK, path="relay")
    before = failures._value.get()
    with clock.frozen(clock.now()), broker(REFUSED) as send:
        result = outbox_relay()
        now = clock.now()
    # One try per pass while the broker refuses: the rest are not hammered.
    assert send.call_count == 1
    assert (result.claimed, result.sent, result.failed, result.untried) == (3, 0, 1, 2)
    assert result.error.startswith("OperationalError")
    assert failures._value.get() == before + 1
    tried = row(first)
    assert tried.status == OutboxStatus.PENDING and tried.attempts == 1
    assert tried.last_error.startswith("OperationalError") and now < tried.available_at
    for message in rest:
        untried = row(message)
        assert untried.status == OutboxStatus.PENDING and untried.attempts == 0
        assert untried.last_error == "earlier"  # not tried: its last error stands
        assert now < untried.available_at <= now + timedelta(seconds=5)
    # The broker is back: everything goes, each message once.
    with later(600), broker() as send:
        assert outbox_relay().sent == 3
    assert send.call_count == 3


@pytest.mark.django_db
def test_retries_back_off_exponentially_up_to_a_minute():
    [message] = due_now(1)
    delays = []
    with (
        clock.frozen(clock.now()),
        broker(REFUSED),
        mock.patch("fleetops.lib.backoff.random.uniform", side_effect=lambda low, high: high),
    ):
        for _ in range(6):
            clock.advance(timedelta(minutes=5))
            assert outbox_relay().failed == 1
            delays.append((row(message).available_at - clock.now()).total_seconds())
    assert delays == [5, 10, 20, 40, 60, 60]
    assert row(message).attempts == 6


@pytest.mark.django_db
def test_a_claimed_message_is_not_due_again_until_its_lease_ends():
    [message] = due_now(1)
    with clock.frozen(clock.now()):
        # A relay that claimed and then died (the send never came back).
        with broker(side_effect=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
            outbox_relay()
        claimed = row(message)
        assert claimed.status == OutboxStatus.PENDING and claimed.attempts == 1
        assert claimed.available_at == clock.now() + timedelta(seconds=CLAIM_LEASE_SECONDS)
        with broker() as send:
            assert outbox_relay().claimed == 0
            clock.advance(timedelta(seconds=CLAIM_LEASE_SECONDS))
            assert outbox_relay().sent == 1
    send.assert_called_once_with(TASK, kwargs={"n": 0}, task_id=f"outbox-{message.pk}-2")


def _in_thread(target: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # surfaced by the caller: a crash in the thread fails the test
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.django_db(transaction=True)
def test_a_relay_skips_messages_another_relay_has_locked_instead_of_waiting_or_sending_them():
    messages = due_now(4)
    locked_ids = [messages[0].pk, messages[1].pk]
    holding, release = threading.Event(), threading.Event()

    def other_relay_mid_claim() -> None:
        with transaction.atomic():
            list(OutboxMessage.objects.select_for_update().filter(pk__in=locked_ids).values_list("pk"))
            holding.set()
            assert release.wait(30)

    thread, errors = _in_thread(other_relay_mid_claim)
    assert holding.wait(30)
    try:
        with broker() as send:
            started = time.monotonic()
            result = outbox_relay()
            assert time.monotonic() - started < 5  # skipped, not waited for
        assert result.sent == 2
        assert sorted(c.kwargs["task_id"] for c in send.call_args_list) == sorted(
            f"outbox-{m.pk}-1" for m in messages[2:]
        )
        assert {row(m).status for m in messages[:2]} == {OutboxStatus.PENDING}
    finally:
        release.set()
        thread.join(30)
    assert errors == [] and not thread.is_alive()
    with broker() as send:
        assert outbox_relay().sent == 2  # released: now they go, once
    assert {row(m).status for m in messages} == {OutboxStatus.SENT}


@pytest.mark.django_db(transaction=True)
def test_two_relays_on_separate_connections_never_send_one_message_twice():
    messages = due_now(120)
    taken: list[str] = []
    lock = threading.Lock()

    def publish(name: str, kwargs: dict[str, Any], **options: Any) -> None:
        time.sleep(0.002)  # a broker round trip: the relays overlap
        with lock:
            taken.append(options["task_id"].split("-")[1])

    start = threading.Barrier(2)

    def relay_until_empty() -> None:
        start.wait(10)
        while outbox_relay(limit=7).claimed:
            pass

    with broker(publish):
        threads = [_in_thread(relay_until_empty) for _ in range(2)]
        for thread, _ in threads:
            thread.join(60)
    assert [e for _, errors in threads for e in errors] == []
    assert sorted(taken) == sorted(str(m.pk) for m in messages)  # each exactly once
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}


# --- the beat task, pruning, gauges, status --------------------------------------------------------


@pytest.mark.django_db
def test_the_relay_task_writes_its_heartbeat_and_fails_it_while_the_broker_refuses():
    due_now(2)
    with broker(REFUSED):
        tasks.relay()
    beat = Heartbeat.objects.get(name=tasks.RELAY_HEARTBEAT)
    assert beat.failures == 1 and beat.last_error.startswith("OperationalError")
    assert beat.details["failed"] == 1 and beat.details["untried"] == 1
    with later(600), broker():
        tasks.relay()
    beat.refresh_from_db()
    assert beat.last_success_at == beat.last_beat_at and beat.details["sent"] == 2


def test_the_relay_is_a_declared_schedule_every_ten_seconds_expiring_before_the_next():
    declared = {s.name: s for s in schedules.declared()}
    relay = declared["outbox.relay"]
    assert (relay.task, relay.every_seconds) == ("fleetops.outbox.tasks.relay", 10)
    assert 0 < relay.expires_seconds < relay.every_seconds
    assert declared["outbox.prune"].task == "fleetops.outbox.tasks.prune"


@pytest.mark.django_db
def test_prune_deletes_old_sent_messages_and_never_a_pending_one():
    now = clock.now()
    _old_sent, recent_sent = due_now(2, status=OutboxStatus.SENT, sent_at=now - timedelta(days=8))
    OutboxMessage.objects.filter(pk=recent_sent.pk).update(sent_at=now - timedelta(days=1))
    [old_pending] = due_now(1)
    OutboxMessage.objects.filter(pk=old_pending.pk).update(created_at=now - timedelta(days=30))
    assert outbox_prune() == 1
    assert set(OutboxMessage.objects.values_list("pk", flat=True)) == {recent_sent.pk, old_pending.pk}


@pytest.mark.django_db
def test_the_backlog_gauges_count_pending_messages_and_the_age_of_the_oldest(client):
    with clock.frozen(clock.now()):
        assert outbox_backlog().pending == 0 and outbox_backlog().oldest_age_seconds == 0
        due_now(3)
        OutboxMessage.objects.filter(pk=OutboxMessage.objects.order_by("id")[0].pk).update(
            created_at=clock.now() - timedelta(minutes=15)
        )
        due_now(1, status=OutboxStatus.SENT, sent_at=clock.now())
        families = {f.name: f for f in collect_backlog()}
        assert families["fleetops_outbox_pending_messages"].samples[0].value == 3
        assert families["fleetops_outbox_oldest_pending_age_seconds"].samples[0].value == 900
        check = check_outbox()
        assert check.status == "warn" and check.summary.startswith("3 pending")
    body = client.get("/metrics").content.decode()
    assert "fleetops_outbox_pending_messages 3.0" in body
    assert "fleetops_outbox_oldest_pending_age_seconds" in body


@pytest.mark.django_db
def test_the_relay_command_drains_what_is_due_and_fails_loudly_while_the_broker_refuses():
    due_now(5)
    with broker(REFUSED), pytest.raises(CommandError, match="broker refused"):
        call_command("outbox_relay", "--limit", "2")
    out = io.StringIO()
    with later(600), broker() as send:
        call_command("outbox_relay", "--limit", "2", stdout=out)
    assert "5 sent" in out.getvalue() and send.call_count == 5
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}
