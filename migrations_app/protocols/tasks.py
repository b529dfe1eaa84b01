"""Thin Celery tasks: the admin's "Start history migration" / "Start current-state migration" run
the same services as `manage.py protocol_migrate` on a worker, "Classify again" the same service as
`manage.py protocol_setup`. A run blocks its worker slot until the handoff; a redelivery after a
worker crash resumes at cursor + 1.

The services queue these by name (`services.CLASSIFY_TASK`, …) through the outbox, in the
request's transaction, so the two modules do not import each other; a broker outage delays a run,
never loses it, and a duplicate delivery is harmless (see `services._kick`). The actor travels as
`Actor.to_payload()` and is rebuilt with every field (`Actor.from_payload`): a superuser's or a
session's request runs with the same rights on the worker as in the web request. The chain travels
as its slug (a protocol is identified by (chain, protocol id)); a message queued without one names a
protocol registered on a single chain.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from fleetops.audit.actors import Actor
from fleetops.lib.errors import DomainError
from fleetops.observability.context import bound
from migrations_app.models import Protocol
from migrations_app.protocols.current_state import current_state_migrate as run_current_state
from migrations_app.protocols.history import history_migrate as run_history
from migrations_app.protocols.services import (
    CLASSIFY_TASK,
    CURRENT_STATE_TASK,
    HISTORY_TASK,
    protocol_classify,
)

log = logging.getLogger(__name__)


@shared_task(name=HISTORY_TASK, ignore_result=True)
def history_migrate(
    *, protocol_ids: list[str], window_size: int, actor: dict[str, Any], chain: str | None = None
) -> None:
    with bound(actor=f"task:protocol_history:{chain or ''}:{','.join(protocol_ids)}"):
        try:
            run_history(
                protocol_ids=protocol_ids,
                chain=chain,
                window_size=window_size,
                actor=Actor.from_payload(actor),
            )
        except DomainError as exc:  # recorded on the protocol and in the audit log already
            log.warning("history migration stopped: %s", exc.message)


@shared_task(name=CURRENT_STATE_TASK, ignore_result=True)
def current_state_migrate(
    *,
    protocol_id: str,
    start_height: int,
    window_size: int,
    actor: dict[str, Any],
    chain: str | None = None,
) -> None:
    with bound(actor=f"task:protocol_current_state:{chain or ''}:{protocol_id}"):
        try:
            run_current_state(
                protocol_id=protocol_id,
                chain=chain,
                start_height=start_height,
                window_size=window_size,
                actor=Actor.from_payload(actor),
            )
        except DomainError as exc:
            log.warning("current-state migration stopped: %s", exc.message)


@shared_task(name=CLASSIFY_TASK, ignore_result=True)
def classify(*, protocol_id: str, actor: dict[str, Any], chain: str | None = None) -> None:
    with bound(actor=f"task:protocol_classify:{chain or ''}:{protocol_id}"):
        found = Protocol.objects.select_related("chain__org").filter(protocol_id=protocol_id)
        if chain is not None:
            found = found.filter(chain__slug=chain)
        candidates = list(found[:2])
        if len(candidates) != 1:
            log.warning(
                "classification skipped: protocol %s on %s is gone or ambiguous", protocol_id, chain or "?"
            )
            return
        protocol = candidates[0]
        try:
            result = protocol_classify(protocol=protocol, actor=Actor.from_payload(actor))
        except DomainError as exc:  # another classification running, or the role was revoked
            log.warning("classification not run: %s", exc.message)
            return
        log.info(
            "protocol classified",
            extra={
                "protocol": protocol_id,
                "chain": protocol.chain.slug,
                "status": result.status,
                "accepted": len(result.accepted),
            },
        )
