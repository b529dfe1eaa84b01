"""Protocol writes an operator starts: register (setup), classify, and request a classification, a
history or a current-state migration from the admin (a Celery task running the same service as the
command; the request is validated first, so a bad one is refused there and changes nothing).

Keyword-only, one transaction each, the role re-checked here, an audit row inside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Q

from fleetops.access.models import Role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Forbidden, RaceLost, ValidationFailed
from indexer.models import Chain, Event
from indexer.services import actor_role
from migrations_app.models import MigrationStatus, Protocol, ProtocolContract
from migrations_app.protocols import registry
from migrations_app.protocols.current_state import current_state_validate
from migrations_app.protocols.history import (
    DEFAULT_WINDOW_SIZE,
    UNKNOWN_PROTOCOL,
    check_window_size,
    history_validate,
    set_status,
)
from migrations_app.protocols.registry import ProtocolSpec, attribute_map

log = logging.getLogger(__name__)

ADMIN_ONLY = "starting a protocol migration needs the admin role in the chain's organization"
REASON_REQUIRED = "reason is required (1-256 characters, not blank)"
CHAIN_REQUIRED = "several chains exist ({chains}); say which with --chain"
NO_CHAIN = "no chain is configured; create one (e.g. `manage.py indexer_demo_seed`) first"
CHAIN_UNKNOWN = "no chain {slug}"
# Generic on purpose: the chain it is registered on may belong to another organization.
CHAIN_CHANGED = "protocol {id} is already registered on another chain"
CLASSIFICATION_RUNNING = "protocol {id} is being classified by another process"
CLASSIFICATION_MOVED = "the classification of {id} was settled by another process meanwhile"
# Starting a classification: from any state but a running one...
CLASSIFICATION_STARTABLE = (MigrationStatus.NOT_STARTED, MigrationStatus.SUCCESS, MigrationStatus.FAILED)
# ...or from one that has been `in_progress` (row untouched) this long: its process died mid-way. A
# classification is a few queries over the stored events, minutes at worst.
CLASSIFICATION_STALE_AFTER = timedelta(minutes=30)
# Events looked at per contract when classifying it (all must classify).
SAMPLES_PER_CONTRACT = 5


@dataclass
class Classification:
    protocol_id: str
    status: str
    accepted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    error: str = ""


def _require_admin(*, actor: Actor, chain: Chain) -> None:
    if not Role.at_least(actor_role(actor=actor, org_id=chain.org_id), Role.ADMIN):
        raise Forbidden(ADMIN_ONLY)


def _reason(reason: str) -> str:
    text = (reason or "").strip()
    if not text or len(text) > 256:
        raise ValidationFailed(REASON_REQUIRED, fields={"reason": [REASON_REQUIRED]})
    return text


def chain_for_setup(*, slug: str | None) -> Chain:
    if slug:
        chain = Chain.objects.filter(slug=slug).select_related("org").first()
        if chain is None:
            raise ValidationFailed(CHAIN_UNKNOWN.format(slug=slug))
        return chain
    chains = list(Chain.objects.select_related("org").order_by("slug")[:10])
    if not chains:
        raise ValidationFailed(NO_CHAIN)
    if len(chains) > 1:
        raise ValidationFailed(CHAIN_REQUIRED.format(chains=", ".join(c.slug for c in chains)))
    return chains[0]


def protocol_register(*, protocol_id: str, chain: Chain, actor: Actor) -> Protocol:
    """Create the protocol row from its registered classifier, once (like the seed's
    `INSERT … ON CONFLICT DO NOTHING`)."""
    spec = registry.get(protocol_id)
    if spec is None:
        known = ", ".join(s.id for s in registry.all_specs())
        raise ValidationFailed(
            UNKNOWN_PROTOCOL.format(id=protocol_id, known=known), fields={"protocol_id": [protocol_id]}
        )
    _require_admin(actor=actor, chain=chain)
    with transaction.atomic():
        protocol, created = Protocol.objects.select_related("chain__org").get_or_create(
            id=spec.id, defaults={"chain": chain, "name": spec.name}
        )
        if protocol.chain_id != chain.pk:
            raise ValidationFailed(CHAIN_CHANGED.format(id=spec.id))
        if created:
            record(
                action="protocol.registered",
                actor=actor,
                org=chain.org,
                target=protocol,
                metadata={"chain": chain.slug},
            )
    return protocol


# Every contract seen, its first height and its first SAMPLES_PER_CONTRACT events, in one query.
_SAMPLES = f"""
SELECT contract, height, type, attributes FROM (
    SELECT contract, height, type, attributes,
           row_number() OVER (PARTITION BY contract ORDER BY height) AS n
    FROM (
        SELECT height, type, attributes,
               jsonb_path_query_first(attributes, '$[*] ? (@.key == $k).value',
                                      jsonb_build_object('k', %s::text)) #>> '{{}}' AS contract
        FROM {Event._meta.db_table} WHERE chain_id = %s AND type = ANY(%s)
    ) seen WHERE contract IS NOT NULL AND contract <> ''
) ranked WHERE n <= %s ORDER BY contract, n
"""  # noqa: S608 - table name from the model


def _classify_contracts(spec: ProtocolSpec, chain: Chain) -> tuple[dict[str, int], list[str]]:
    """Contracts seen so far with their first height, split into accepted (every sampled event of
    the contract classifies as the protocol) and rejected."""
    types = sorted(spec.event_types)
    with connection.cursor() as cursor:
        cursor.execute(_SAMPLES, [spec.contract_key, chain.pk, types, SAMPLES_PER_CONTRACT])
        samples = cursor.fetchall()
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


def _classification_startable() -> Q:
    stale = clock.now() - CLASSIFICATION_STALE_AFTER
    return Q(classification_status__in=CLASSIFICATION_STARTABLE) | Q(
        classification_status=MigrationStatus.IN_PROGRESS, updated_at__lt=stale
    )


def protocol_classify(*, protocol: Protocol, actor: Actor) -> Classification:
    """classification not_started | success | failed (or a stale in_progress) -> in_progress ->
    success (contracts recorded) | failed (error recorded). A second classification while one runs
    is a Conflict (CLASSIFICATION_RUNNING)."""
    spec = registry.get(protocol.id)
    assert spec is not None
    chain = protocol.chain
    _require_admin(actor=actor, chain=chain)
    with transaction.atomic():
        if not set_status(
            protocol=protocol,
            field_name="classification_status",
            to=MigrationStatus.IN_PROGRESS,
            allowed=(*CLASSIFICATION_STARTABLE, MigrationStatus.IN_PROGRESS),
            where=_classification_startable(),
            actor=actor,
            action="protocol.classification_started",
        ):
            raise Conflict(CLASSIFICATION_RUNNING.format(id=protocol.id))
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
            won = set_status(
                protocol=protocol,
                field_name="classification_status",
                to=MigrationStatus.SUCCESS,
                allowed=(MigrationStatus.IN_PROGRESS,),
                actor=actor,
                action="protocol.classified",
                extra={"classified_at": now, "classification_error": ""},
                metadata={"accepted": len(accepted), "rejected": rejected[:50]},
            )
            if not won:  # taken over as stale: roll our contracts back, the other run's result stands
                raise RaceLost(CLASSIFICATION_MOVED.format(id=protocol.id))
    except RaceLost:
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.exception("protocol classification failed", extra={"protocol": protocol.id})
        with transaction.atomic():
            won = set_status(
                protocol=protocol,
                field_name="classification_status",
                to=MigrationStatus.FAILED,
                allowed=(MigrationStatus.IN_PROGRESS,),
                actor=actor,
                action="protocol.classification_failed",
                extra={"classification_error": message[:2000]},
                metadata={"error": message[:500]},
            )
        if not won:
            raise RaceLost(CLASSIFICATION_MOVED.format(id=protocol.id)) from exc
        return Classification(protocol.id, MigrationStatus.FAILED, error=message)
    return Classification(protocol.id, MigrationStatus.SUCCESS, accepted=sorted(accepted), rejected=rejected)


def protocol_classify_request(*, protocol: Protocol, actor: Actor, reason: str) -> None:
    """Queue a classification of `protocol` on a worker (the admin's "Classify again"): it reads
    every stored event of the protocol's types, too long for a web request. Refused now when one is
    running; the worker's compare-and-set settles a race between two requests."""
    text = _reason(reason)
    _require_admin(actor=actor, chain=protocol.chain)
    if not Protocol.objects.filter(_classification_startable(), pk=protocol.pk).exists():
        raise Conflict(CLASSIFICATION_RUNNING.format(id=protocol.id))
    from migrations_app.protocols import tasks

    with transaction.atomic():
        record(
            action="protocol.classification_requested",
            actor=actor,
            org=protocol.chain.org,
            target=protocol,
            reason=text,
        )
        transaction.on_commit(
            lambda: tasks.classify.delay(protocol_id=protocol.id, actor=_actor_payload(actor))
        )


def _actor_payload(actor: Actor) -> dict[str, Any]:
    return {"type": str(actor.type), "id": actor.id, "label": actor.label, "user_id": actor.user_id}


def protocol_history_request(
    *, protocol: Protocol, actor: Actor, reason: str, window_size: int = DEFAULT_WINDOW_SIZE
) -> bool:
    """Queue the history migration of `protocol` on a worker (the admin's "Start history
    migration"). Validated now, so a bad request is refused here and changes nothing; returns False
    when there is nothing to do (already `success`)."""
    text = _reason(reason)
    _require_admin(actor=actor, chain=protocol.chain)
    check_window_size(window_size)
    _, todo, _ = history_validate(protocol_ids=[protocol.id], window_size=window_size)
    if not todo:
        return False
    from migrations_app.protocols import tasks

    with transaction.atomic():
        record(
            action="protocol.history_requested",
            actor=actor,
            org=protocol.chain.org,
            target=protocol,
            reason=text,
            metadata={"window_size": window_size},
        )
        transaction.on_commit(
            lambda: tasks.history_migrate.delay(
                protocol_ids=[protocol.id], window_size=window_size, actor=_actor_payload(actor)
            )
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
    from migrations_app.protocols import tasks

    text = _reason(reason)
    _require_admin(actor=actor, chain=protocol.chain)
    _, todo, _ = current_state_validate(
        protocol_id=protocol.id, start_height=start_height, window_size=window_size
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
        transaction.on_commit(
            lambda: tasks.current_state_migrate.delay(
                protocol_id=protocol.id,
                start_height=start_height,
                window_size=window_size,
                actor=_actor_payload(actor),
            )
        )
    return True
