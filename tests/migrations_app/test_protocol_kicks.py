"""Accepted means done: the admin's protocol requests (*Classify again*, *Start history migration*,
*Start current-state migration*) made while the broker is down answer with their success message,
leave the request's outbox message pending, and the relay sends it once the broker is back, so the
work is carried out with no operator action. (Before the outbox, the kick failed after the audit
row had committed: a 500, and the protocol stayed `not_started` for good.)"""

from __future__ import annotations

from typing import Any

import pytest

from fleetops.audit.models import AuditEvent
from fleetops.outbox.metrics import SEND_FAILURES
from fleetops.outbox.models import OutboxStatus
from migrations_app.models import MigrationStatus, Protocol
from migrations_app.protocols import services, tasks
from tests.factories import make_indexed_chain
from tests.migrations_app.protocol_fixtures import assert_queued_with_its_request

pytestmark = pytest.mark.django_db
ADMIN = "/admin/migrations_app"

REQUESTS = [
    pytest.param(
        "classify",
        {"reason": "new contracts"},
        services.CLASSIFY_TASK,
        "protocol.classification_requested",
        "Classification queued",
        id="classify",
    ),
    pytest.param(
        "start_history",
        {"reason": "backfill", "window_size": 10},
        services.HISTORY_TASK,
        "protocol.history_requested",
        "History migration queued",
        id="history",
    ),
    pytest.param(
        "start_current_state",
        {"reason": "balances", "window_size": 10, "start_height": 2},
        services.CURRENT_STATE_TASK,
        "protocol.current_state_requested",
        "Current-state migration queued",
        id="current_state",
    ),
]


@pytest.fixture
def protocol(org) -> Protocol:
    chain = make_indexed_chain(org, blocks=6)
    return Protocol.objects.create(
        protocol_id="SEP41", chain=chain, name="SEP-41", classification_status=MigrationStatus.SUCCESS
    )


@pytest.mark.parametrize(("action", "form", "task", "audit_action", "success"), REQUESTS)
def test_a_request_accepted_while_the_broker_is_down_is_sent_by_the_relay_once_it_is_back(
    client,
    protocol,
    admin_member,
    sent_tasks,
    django_capture_on_commit_callbacks,
    action: str,
    form: dict[str, Any],
    task: str,
    audit_action: str,
    success: str,
):
    failures = SEND_FAILURES.labels(task=task, path="immediate")
    before = failures._value.get()
    client.force_login(admin_member.user)
    sent_tasks.down = True
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"{ADMIN}/protocol/{protocol.pk}/action/{action}/", form, follow=True)
    # The operator is told it is queued, and it is: durable, with the request's audit row.
    assert response.status_code == 200 and success in response.content.decode()
    [message] = sent_tasks.messages()
    assert_queued_with_its_request(message, audit_action)
    assert (message.task, message.status, message.attempts) == (task, OutboxStatus.PENDING, 1)
    assert message.last_error.startswith("OperationalError")
    assert failures._value.get() == before + 1
    assert sent_tasks == []

    sent_tasks.down = False
    assert sent_tasks.relay_later() == 1
    assert sent_tasks.relay_later() == 0
    assert sent_tasks == [(task, message.kwargs)]
    assert message.kwargs["actor"]["label"] == admin_member.user.username
    message.refresh_from_db()
    assert message.status == OutboxStatus.SENT and message.attempts == 2
    assert AuditEvent.objects.filter(action=audit_action).count() == 1


def test_a_classification_queued_during_the_outage_is_carried_out_once_the_relay_sends_it(
    client, protocol, admin_member, sent_tasks, django_capture_on_commit_callbacks
):
    Protocol.objects.filter(pk=protocol.pk).update(classification_status=MigrationStatus.NOT_STARTED)
    client.force_login(admin_member.user)
    sent_tasks.down = True
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"{ADMIN}/protocol/{protocol.pk}/action/classify/", {"reason": "go"})
    assert response.status_code == 302
    assert Protocol.objects.get(pk=protocol.pk).classification_status == MigrationStatus.NOT_STARTED
    sent_tasks.down = False
    assert sent_tasks.relay_later() == 1
    [kwargs] = sent_tasks.of(services.CLASSIFY_TASK)
    tasks.classify(**kwargs)  # the worker's side
    assert Protocol.objects.get(pk=protocol.pk).classification_status == MigrationStatus.SUCCESS
    assert AuditEvent.objects.filter(action="protocol.classified", target_id=protocol.pk).count() == 1
