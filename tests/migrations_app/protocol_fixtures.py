"""Fixtures of the protocol tests: the Celery tasks the services kick by name, captured instead of
sent. A kick is an outbox message written in the request's transaction (`fleetops.outbox`), sent
with `current_app.send_task(name, kwargs=...)` once the request commits or by the relay later; the
fake broker here records what it took, or refuses everything while `down` is set."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from kombu.exceptions import OperationalError

from fleetops.audit.models import AuditEvent
from fleetops.celery import app
from fleetops.lib import clock
from fleetops.outbox.models import OutboxMessage
from fleetops.outbox.services import IMMEDIATE_GRACE_SECONDS, outbox_relay


class SentTasks(list[tuple[str, dict[str, Any]]]):
    """(task name, kwargs) of every task the broker took, in order."""

    down = False

    def of(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for sent, kwargs in self if sent == name]

    @staticmethod
    def messages(name: str | None = None) -> list[OutboxMessage]:
        """The outbox messages (of task `name`), oldest first."""
        rows = OutboxMessage.objects.order_by("id")
        return list(rows if name is None else rows.filter(task=name))

    def relay_later(self) -> int:
        """Run the relay once every message is due (past the on-commit send's grace and any
        backoff); returns how many it sent."""
        with clock.frozen(clock.now() + timedelta(seconds=IMMEDIATE_GRACE_SECONDS + 120)):
            return outbox_relay().sent


def assert_queued_with_its_request(message: OutboxMessage, action: str) -> None:
    """The message was written by the request that wrote the audit row `action`: same request id
    (and so the same transaction, which both refuse to run outside of)."""
    audit = AuditEvent.objects.get(action=action)
    assert message.request_id and message.request_id == audit.request_id


@pytest.fixture
def sent_tasks(monkeypatch: pytest.MonkeyPatch) -> SentTasks:
    sent = SentTasks()

    def send_task(name: str, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any) -> None:
        if sent.down:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        sent.append((name, dict(kwargs or {})))

    # The outbox sends through `celery.current_app`, which is this app.
    monkeypatch.setattr(app, "send_task", send_task)
    assert current_app.send_task is send_task
    return sent
