"""Thin Celery tasks: the admin's "Start history migration" / "Start current-state migration" run
the same services as `manage.py protocol_migrate` on a worker, "Classify again" the same service as
`manage.py protocol_setup`. A run blocks its worker slot until the
handoff; a redelivery after a worker crash resumes at cursor + 1."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from fleetops.audit.actors import Actor
from fleetops.audit.models import ActorType
from fleetops.lib.errors import DomainError
from fleetops.observability.context import bound

log = logging.getLogger(__name__)


def _actor(payload: dict[str, Any]) -> Actor:
    return Actor(
        type=ActorType(payload.get("type", ActorType.SYSTEM)),
        id=str(payload.get("id", "")),
        label=str(payload.get("label", "")),
        user_id=payload.get("user_id"),
    )


@shared_task(name="migrations_app.protocols.tasks.history_migrate", ignore_result=True)
def history_migrate(*, protocol_ids: list[str], window_size: int, actor: dict[str, Any]) -> None:
    from migrations_app.protocols.history import history_migrate as run

    with bound(actor=f"task:protocol_history:{','.join(protocol_ids)}"):
        try:
            run(protocol_ids=protocol_ids, window_size=window_size, actor=_actor(actor))
        except DomainError as exc:  # recorded on the protocol and in the audit log already
            log.warning("history migration stopped: %s", exc.message)


@shared_task(name="migrations_app.protocols.tasks.current_state_migrate", ignore_result=True)
def current_state_migrate(
    *, protocol_id: str, start_height: int, window_size: int, actor: dict[str, Any]
) -> None:
    from migrations_app.protocols.current_state import current_state_migrate as run

    with bound(actor=f"task:protocol_current_state:{protocol_id}"):
        try:
            run(
                protocol_id=protocol_id,
                start_height=start_height,
                window_size=window_size,
                actor=_actor(actor),
            )
        except DomainError as exc:
            log.warning("current-state migration stopped: %s", exc.message)


@shared_task(name="migrations_app.protocols.tasks.classify", ignore_result=True)
def classify(*, protocol_id: str, actor: dict[str, Any]) -> None:
    from migrations_app.models import Protocol
    from migrations_app.protocols.services import protocol_classify

    with bound(actor=f"task:protocol_classify:{protocol_id}"):
        protocol = Protocol.objects.select_related("chain__org").filter(pk=protocol_id).first()
        if protocol is None:
            log.warning("classification skipped: protocol %s is gone", protocol_id)
            return
        try:
            result = protocol_classify(protocol=protocol, actor=_actor(actor))
        except DomainError as exc:  # another classification running, or the role was revoked
            log.warning("classification not run: %s", exc.message)
            return
        log.info(
            "protocol classified",
            extra={"protocol": protocol_id, "status": result.status, "accepted": len(result.accepted)},
        )
