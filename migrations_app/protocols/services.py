"""Protocol writes an operator starts: register (setup), classify, and request a history or
current-state migration from the admin (a Celery task running the same service as the command).

Keyword-only, one transaction each, the role re-checked here, an audit row inside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from fleetops.access.models import Role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import DomainError, Forbidden, ValidationFailed
from indexer.models import Chain, Event
from indexer.services import actor_role
from migrations_app.models import CLASSIFICATION_TRANSITIONS, MigrationStatus, Protocol, ProtocolContract
from migrations_app.protocols import registry
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
CHAIN_CHANGED = "protocol {id} is registered on chain {current}, not {asked}"
CLASSIFICATION_RUNNING = "protocol {id} is being classified by another process"
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
            raise ValidationFailed(
                CHAIN_CHANGED.format(id=spec.id, current=protocol.chain.slug, asked=chain.slug)
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


_CONTRACTS = f"""
SELECT contract, min(height) FROM (
    SELECT height,
           jsonb_path_query_first(attributes, '$[*] ? (@.key == $k).value', jsonb_build_object('k', %s::text))
           #>> '{{}}' AS contract
    FROM {Event._meta.db_table} WHERE chain_id = %s AND type = ANY(%s)
) seen WHERE contract IS NOT NULL AND contract <> '' GROUP BY contract ORDER BY contract
"""  # noqa: S608 - table name from the model
_SAMPLES = f"""
SELECT type, attributes FROM {Event._meta.db_table}
WHERE chain_id = %s AND type = ANY(%s)
  AND attributes @> jsonb_build_array(jsonb_build_object('key', %s::text, 'value', %s::text))
ORDER BY height LIMIT %s
"""  # noqa: S608


def _classify_contracts(spec: ProtocolSpec, chain: Chain) -> tuple[dict[str, int], list[str]]:
    """Contracts seen so far with their first height, split into accepted (every sampled event of
    the contract classifies as the protocol) and rejected."""
    types = sorted(spec.event_types)
    with connection.cursor() as cursor:
        cursor.execute(_CONTRACTS, [spec.contract_key, chain.pk, types])
        seen = [(str(c), int(h)) for c, h in cursor.fetchall()]
        accepted: dict[str, int] = {}
        rejected: list[str] = []
        for contract, first in seen:
            cursor.execute(_SAMPLES, [chain.pk, types, spec.contract_key, contract, SAMPLES_PER_CONTRACT])
            samples = cursor.fetchall()
            if samples and all(spec.classify(t, attribute_map(a)) is not None for t, a in samples):
                accepted[contract] = first
            else:
                rejected.append(contract)
    return accepted, rejected


def protocol_classify(*, protocol: Protocol, actor: Actor) -> Classification:
    """classification in_progress -> success (contracts recorded) | failed (error recorded)."""
    spec = registry.get(protocol.id)
    assert spec is not None
    chain = protocol.chain
    _require_admin(actor=actor, chain=chain)
    with transaction.atomic():
        allowed = [
            s for s, targets in CLASSIFICATION_TRANSITIONS.items() if MigrationStatus.IN_PROGRESS in targets
        ]
        if not set_status(
            protocol=protocol,
            field_name="classification_status",
            to=MigrationStatus.IN_PROGRESS,
            allowed=allowed,
            actor=actor,
            action="protocol.classification_started",
        ):
            raise DomainError(CLASSIFICATION_RUNNING.format(id=protocol.id))
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
            set_status(
                protocol=protocol,
                field_name="classification_status",
                to=MigrationStatus.SUCCESS,
                allowed=(MigrationStatus.IN_PROGRESS,),
                actor=actor,
                action="protocol.classified",
                extra={"classified_at": now, "classification_error": ""},
                metadata={"accepted": len(accepted), "rejected": rejected[:50]},
            )
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.exception("protocol classification failed", extra={"protocol": protocol.id})
        with transaction.atomic():
            set_status(
                protocol=protocol,
                field_name="classification_status",
                to=MigrationStatus.FAILED,
                allowed=(MigrationStatus.IN_PROGRESS,),
                actor=actor,
                action="protocol.classification_failed",
                extra={"classification_error": message[:2000]},
                metadata={"error": message[:500]},
            )
        return Classification(protocol.id, MigrationStatus.FAILED, error=message)
    return Classification(protocol.id, MigrationStatus.SUCCESS, accepted=sorted(accepted), rejected=rejected)


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
    text = _reason(reason)
    _require_admin(actor=actor, chain=protocol.chain)
    check_window_size(window_size)
    if protocol.current_state_migration_status == MigrationStatus.SUCCESS:
        return False
    from migrations_app.protocols import tasks

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
