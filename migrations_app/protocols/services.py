"""Protocol writes an operator starts: register (setup), classify, and request a classification, a
history or a current-state migration from the admin (a Celery task running the same service as the
command, queued by name through the outbox in the transaction of the request's audit row, so a
broker outage delays it but never loses it; the request is validated first, so a bad one is refused
there and changes nothing).

Keyword-only, the actor's role checked here (`fleetops.access.roles`, an audited refusal) before any
transaction, every status change through `migrations_app.protocols.status` (the transition kernel),
an audit row inside each transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from fleetops.access.models import Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, RaceLost, ValidationFailed
from fleetops.lib.machine import Machine
from fleetops.lib.reason import clean_reason
from fleetops.outbox.services import outbox_enqueue
from indexer import selectors as indexer_selectors
from indexer.selectors import ChainModel as Chain
from migrations_app.models import (
    CLASSIFICATION_MACHINE,
    CURRENT_STATE_MACHINE,
    HISTORY_MACHINE,
    MigrationStatus,
    Protocol,
    ProtocolContract,
)
from migrations_app.protocols import registry, status
from migrations_app.protocols.current_state import current_state_validate
from migrations_app.protocols.history import (
    DEFAULT_WINDOW_SIZE,
    UNKNOWN_PROTOCOL,
    check_window_size,
    history_validate,
)
from migrations_app.protocols.registry import ProtocolSpec, attribute_map

log = logging.getLogger(__name__)

ADMIN_ONLY = "starting a protocol migration needs the admin role in the chain's organization"
REGISTER_ADMIN_ONLY = "registering a protocol needs the admin role in the chain's organization"
CHAIN_REQUIRED = "several chains exist ({chains}); say which with --chain"
NO_CHAIN = "no chain is configured; create one (e.g. `manage.py indexer_demo_seed`) first"
CHAIN_UNKNOWN = "no chain {slug}"
CLASSIFICATION_RUNNING = "protocol {id} is being classified by another process"
CLASSIFICATION_MOVED = "the classification of {id} was settled by another process meanwhile"
# Events looked at per contract when classifying it (all must classify).
SAMPLES_PER_CONTRACT = 5
# The workers' task names (`migrations_app.protocols.tasks`): kicked by name, so this module does not
# import the tasks (which import it).
CLASSIFY_TASK = "migrations_app.protocols.tasks.classify"
HISTORY_TASK = "migrations_app.protocols.tasks.history_migrate"
CURRENT_STATE_TASK = "migrations_app.protocols.tasks.current_state_migrate"


@dataclass
class Classification:
    protocol_id: str
    status: str
    accepted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    error: str = ""


def _start_role(machine: Machine) -> str:
    """The role a person needs to start (or resume) a run of `machine`: the highest over its
    person edges into in_progress (the run's own steps are engine edges)."""
    roles = [e.role for e in machine.edges if e.target == MigrationStatus.IN_PROGRESS and e.role]
    return max(roles, key=Role.rank)


def _require_start(*, machine: Machine, protocol: Protocol, actor: Actor, asked: dict[str, Any]) -> None:
    """Refuse (audited `access.denied`, committed before anything else) an actor who may not start
    a run of `machine` on `protocol`."""
    require_role(
        actor=actor,
        org=protocol.chain.org,
        role=_start_role(machine),
        what=f"{machine.name}: start",
        message=ADMIN_ONLY,
        target=protocol,
        asked=asked,
    )


def _kick(task: str, **kwargs: Any) -> None:
    """Queue `task` by name in the request's transaction (an outbox message, sent after commit or
    by the relay once the broker is back). A message delivered twice is harmless: a migration run
    holds the protocol's advisory lock and resumes at its cursor (a `success` is final), and a
    second classification finds the same contracts."""
    outbox_enqueue(task=task, kwargs=kwargs)


def chain_for_setup(*, slug: str | None) -> Chain:
    chains = indexer_selectors.chains_visible(org_ids=None)
    if slug:
        chain = chains.filter(slug=slug).first()
        if chain is None:
            raise ValidationFailed(CHAIN_UNKNOWN.format(slug=slug))
        return chain
    first = list(chains[:10])
    if not first:
        raise ValidationFailed(NO_CHAIN)
    if len(first) > 1:
        raise ValidationFailed(CHAIN_REQUIRED.format(chains=", ".join(c.slug for c in first)))
    return first[0]


def protocol_register(*, protocol_id: str, chain: Chain, actor: Actor) -> Protocol:
    """Create the protocol's row on `chain` from its registered classifier, once per chain (like the
    seed's `INSERT … ON CONFLICT DO NOTHING`): a protocol is identified by (chain, protocol id)."""
    spec = registry.get(protocol_id)
    if spec is None:
        known = ", ".join(s.id for s in registry.all_specs())
        raise ValidationFailed(
            UNKNOWN_PROTOCOL.format(id=protocol_id, known=known), fields={"protocol_id": [protocol_id]}
        )
    require_role(
        actor=actor,
        org=chain.org,
        role=Role.ADMIN,
        what="protocols.register",
        message=REGISTER_ADMIN_ONLY,
        asked={"protocol_id": spec.id, "chain": chain.slug},
    )
    with transaction.atomic():
        protocol, created = Protocol.objects.select_related("chain__org").get_or_create(
            chain=chain, protocol_id=spec.id, defaults={"name": spec.name}
        )
        if created:
            record(
                action="protocol.registered",
                actor=actor,
                org=chain.org,
                target=protocol,
                metadata={"chain": chain.slug},
            )
    return protocol


def _classify_contracts(spec: ProtocolSpec, chain: Chain) -> tuple[dict[str, int], list[str]]:
    """Contracts seen so far with their first height, split into accepted (every sampled event of
    the contract classifies as the protocol) and rejected."""
    samples = indexer_selectors.first_events_by_attribute(
        chain_id=chain.pk, types=spec.event_types, key=spec.contract_key, per_value=SAMPLES_PER_CONTRACT
    )
    first: dict[str, int] = {}
    ok: dict[str, bool] = {}
    for contract, height, event_type, attributes in samples:
        key = str(contract)
        first.setdefault(key, int(height))
        classified = spec.classify(event_type, attribute_map(attributes)) is not None
        ok[key] = ok.get(key, True) and classified
    accepted = {c: h for c, h in first.items() if ok[c]}
    rejected = [c for c in first if not ok[c]]
    return accepted, rejected


def protocol_classify(*, protocol: Protocol, actor: Actor) -> Classification:
    """classification not_started | success | failed (or a stale in_progress) -> in_progress ->
    success (contracts recorded) | failed (error recorded). The start edge is an admin's (checked
    and, when refused, audited by the kernel before anything is written); a second classification
    while one runs is a Conflict (CLASSIFICATION_RUNNING)."""
    spec = registry.get(protocol.protocol_id)
    assert spec is not None
    chain = protocol.chain
    try:
        status.classification_start(protocol=protocol, actor=actor)
    except RaceLost as exc:
        raise Conflict(CLASSIFICATION_RUNNING.format(id=protocol.protocol_id)) from exc
    try:
        accepted, rejected = _classify_contracts(spec, chain)
        now = clock.now()
        with transaction.atomic():
            ProtocolContract.objects.bulk_create(
                [
                    ProtocolContract(protocol=protocol, contract=c, first_seen_height=h, classified_at=now)
                    for c, h in accepted.items()
                ],
                ignore_conflicts=True,
            )
            # Lost: taken over as stale. Our contracts roll back with it; the other run's result stands.
            status.classification_succeed(
                protocol=protocol, actor=actor, accepted=len(accepted), rejected=rejected
            )
    except RaceLost as exc:
        raise RaceLost(CLASSIFICATION_MOVED.format(id=protocol.protocol_id)) from exc
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.exception(
            "protocol classification failed", extra={"protocol": protocol.protocol_id, "chain": chain.slug}
        )
        try:
            status.classification_fail(protocol=protocol, actor=actor, error=message)
        except RaceLost as lost:
            raise RaceLost(CLASSIFICATION_MOVED.format(id=protocol.protocol_id)) from lost
        return Classification(protocol.protocol_id, MigrationStatus.FAILED, error=message)
    return Classification(
        protocol.protocol_id, MigrationStatus.SUCCESS, accepted=sorted(accepted), rejected=rejected
    )


def protocol_classify_request(*, protocol: Protocol, actor: Actor, reason: str) -> None:
    """Queue a classification of `protocol` on a worker (the admin's "Classify again"): it reads
    every stored event of the protocol's types, too long for a web request. Refused now when one is
    running; the worker's compare-and-set settles a race between two requests. The worker acts as
    `actor` (every field, superuser and session included: `Actor.to_payload`)."""
    text = clean_reason(reason)
    _require_start(machine=CLASSIFICATION_MACHINE, protocol=protocol, actor=actor, asked={"reason": text})
    if not Protocol.objects.filter(status.classification_startable_q(), pk=protocol.pk).exists():
        raise Conflict(CLASSIFICATION_RUNNING.format(id=protocol.protocol_id))
    with transaction.atomic():
        record(
            action="protocol.classification_requested",
            actor=actor,
            org=protocol.chain.org,
            target=protocol,
            reason=text,
        )
        _kick(
            CLASSIFY_TASK,
            protocol_id=protocol.protocol_id,
            chain=protocol.chain.slug,
            actor=actor.to_payload(),
        )


def protocol_history_request(
    *, protocol: Protocol, actor: Actor, reason: str, window_size: int = DEFAULT_WINDOW_SIZE
) -> bool:
    """Queue the history migration of `protocol` on a worker (the admin's "Start history
    migration"). Validated now, so a bad request is refused here and changes nothing; returns False
    when there is nothing to do (already `success`)."""
    text = clean_reason(reason)
    _require_start(
        machine=HISTORY_MACHINE,
        protocol=protocol,
        actor=actor,
        asked={"reason": text, "window_size": window_size},
    )
    check_window_size(window_size)
    chain = protocol.chain.slug
    _, todo, _ = history_validate(protocol_ids=[protocol.protocol_id], window_size=window_size, chain=chain)
    if not todo:
        return False
    with transaction.atomic():
        record(
            action="protocol.history_requested",
            actor=actor,
            org=protocol.chain.org,
            target=protocol,
            reason=text,
            metadata={"window_size": window_size},
        )
        _kick(
            HISTORY_TASK,
            protocol_ids=[protocol.protocol_id],
            chain=chain,
            window_size=window_size,
            actor=actor.to_payload(),
        )
    return True


def protocol_current_state_request(
    *,
    protocol: Protocol,
    actor: Actor,
    reason: str,
    start_height: int,
    window_size: int = DEFAULT_WINDOW_SIZE,
) -> bool:
    """Queue the current-state migration of `protocol` from `start_height` on a worker. Validated
    now with the run's own checks (`current_state_validate`), so a bad request is refused here and
    changes nothing; returns False when there is nothing to do (already `success`)."""
    text = clean_reason(reason)
    _require_start(
        machine=CURRENT_STATE_MACHINE,
        protocol=protocol,
        actor=actor,
        asked={"reason": text, "start_height": start_height, "window_size": window_size},
    )
    chain = protocol.chain.slug
    _, todo, _ = current_state_validate(
        protocol_id=protocol.protocol_id, start_height=start_height, window_size=window_size, chain=chain
    )
    if todo is None:
        return False
    with transaction.atomic():
        record(
            action="protocol.current_state_requested",
            actor=actor,
            org=protocol.chain.org,
            target=protocol,
            reason=text,
            metadata={"window_size": window_size, "start_height": start_height},
        )
        _kick(
            CURRENT_STATE_TASK,
            protocol_id=protocol.protocol_id,
            chain=chain,
            start_height=start_height,
            window_size=window_size,
            actor=actor.to_payload(),
        )
    return True
