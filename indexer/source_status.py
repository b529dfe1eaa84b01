"""A sync source's connection status (`indexer.models.CONNECTION_MACHINE`): the writer's steps and
the operator's clear. `indexer.sources` decides which status a source should have after every
runner step; this module moves it there.

Every status change is one step of the machine through the transition kernel
(`fleetops.lib.transition`: compare-and-set over the allowed from-states, a lost race counted
once); a jump the machine does not allow in one step (disconnected -> connected) walks the shortest
legal path, so it never skips a state; `disconnecting` is only walked through for an intentional
disconnect (`intentional=True`: an operator disabled the source, or the process stops), a lost
connection drops straight to `disconnected`. The writer's steps are not audited (they follow the
sources' health after every step; `fleetops_indexer_source_transitions_total` counts them); an
operator clearing a historic range failure (`source_clear_degraded`) or re-enabling a refused
source (`source_reenable`) writes one audit row.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Iterable
from typing import Any

from django.db import transaction

from fleetops.access.models import Role
from fleetops.access.roles import require_role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib import clock
from fleetops.lib.errors import RaceLost, ValidationFailed
from fleetops.lib.reason import clean_reason
from fleetops.lib.transition import transition
from indexer.blocks import WRITER
from indexer.metrics import SOURCE_TRANSITIONS
from indexer.models import CONNECTION_MACHINE, Chain, ConnectionStatus, DegradedReason, SyncSource

log = logging.getLogger(__name__)

S = ConnectionStatus
REASON_ORDER = [r.value for r in DegradedReason]
NOTHING_TO_CLEAR = "the source has no historic range failure to clear"
CLEAR_ROLE = "clearing a source's historic range failure needs the {role} role in the chain's organization"
CLEAR_ACTION = "indexer.source.clear_degraded"
REENABLE_ACTION = "indexer.source.reenabled"
NOT_REFUSED = "the source is not refused; only a refused source is re-enabled"
REENABLE_ROLE = "re-enabling a refused source needs the {role} role in the chain's organization"

# "blocks 1\u2013199 unavailable (pruned below 200)" (an en dash, as operators read ranges): written
# by indexer.sources and read back there, so the failed range survives a restart without a schema
# field of its own; the operator's clear removes the fragment.
DASH = "\u2013"
RANGE_FRAGMENT = re.compile(rf"blocks (\d+){DASH}(\d+) unavailable \(([^()]*)\)")


# Errors no retry fixes (the name does not exist, the certificate or the TLS handshake is wrong, the
# URL or the server does not speak HTTP/JSON-RPC): the source is refused until an operator re-enables
# it. A temporary resolver failure ("Temporary failure in name resolution") is an outage, not this.
_REFUSALS = (
    ("DNS", re.compile(r"name or service not known|nodename nor servname|no address associated", re.I)),
    ("TLS", re.compile(r"\[SSL|certificate verify failed|\bTLS\b|SSLError", re.I)),
    (
        "protocol",
        re.compile(r"^(UnsupportedProtocol|RemoteProtocolError|LocalProtocolError|ProtocolError)\b"),
    ),
)


def refusal(error: str) -> str | None:
    """ "DNS: ...", "TLS: ..." or "protocol: ..." when `error` is one no retry fixes, else None."""
    for kind, pattern in _REFUSALS:
        if pattern.search(error or ""):
            return f"{kind} error: {error}"[:500]
    return None


def _hop_preference(status: int) -> tuple[bool, bool, int]:
    # Walks avoid syncing, disconnecting and refused unless they are the goal: a source that merely
    # answers is connected, not syncing, and a jump between live states never passes through a
    # disconnect.
    return (status == S.SYNCING, status in (S.DISCONNECTING, S.REFUSED), status)


def transition_path(frm: int, to: int) -> list[int]:
    """The states after `frm` on the shortest legal way to `to` ([] when already there)."""
    if frm == to:
        return []
    previous: dict[int, int] = {}
    queue: deque[int] = deque([frm])
    seen = {frm}
    while queue:
        state = queue.popleft()
        for nxt in sorted(CONNECTION_MACHINE.targets(state), key=_hop_preference):
            if nxt in seen:
                continue
            seen.add(nxt)
            previous[nxt] = state
            if nxt == to:
                path = [to]
                while path[-1] in previous and previous[path[-1]] != frm:
                    path.append(previous[path[-1]])
                return path[::-1]
            queue.append(nxt)
    raise ValueError(f"no transition path from {S(frm).label} to {S(to).label}")


def ordered_reasons(reasons: Iterable[str]) -> list[str]:
    wanted = {str(r) for r in reasons}
    unknown = wanted - set(REASON_ORDER)
    if unknown:
        raise ValueError(f"unknown degraded reasons: {sorted(unknown)}")
    return [r for r in REASON_ORDER if r in wanted]


def _chain_label(source: SyncSource) -> str:
    if SyncSource.chain.is_cached(source):
        return source.chain.slug
    return str(source.chain_id)


def source_transition(
    *,
    source: SyncSource,
    to: int,
    reasons: Iterable[str] = (),
    detail: str = "",
    actor: Actor = WRITER,
    intentional: bool = False,
    updates: dict[str, Any] | None = None,
) -> bool:
    """Move `source` to status `to`, walking intermediate states where the machine needs them; the
    last step also sets the degraded reasons and detail (and `updates`). `intentional` with `to`
    disconnected walks through disconnecting (an operator's or the system's disconnect). Every step
    goes through the kernel, so of two writers racing one transition exactly one wins; the loser
    gets False (counted as race_lost) and the instance keeps the last state it reached. The
    writer's steps: not audited.

    Already at `to`: only the reasons and detail are brought up to date, and the result is False
    (no transition happened)."""
    target = S(to)
    ordered = ordered_reasons(reasons)
    detail = detail[:2000]
    label = _chain_label(source)
    if source.connection_status == target:
        if (source.degraded_reasons or []) != ordered or source.degraded_detail != detail:
            changed = SyncSource.objects.filter(pk=source.pk, connection_status=target).update(
                degraded_reasons=ordered, degraded_detail=detail
            )
            if changed:
                source.degraded_reasons, source.degraded_detail = ordered, detail
        return False
    path = transition_path(source.connection_status, target)
    if (
        intentional
        and target == S.DISCONNECTED
        and CONNECTION_MACHINE.can(source.connection_status, S.DISCONNECTING)
    ):
        path = [S.DISCONNECTING, S.DISCONNECTED]
    for hop in path:
        before = S(source.connection_status).label
        fields: dict[str, object] = {"status_changed_at": clock.now()}
        if hop == target:
            fields.update(degraded_reasons=ordered, degraded_detail=detail, **(updates or {}))
        try:
            transition(
                source,
                machine=CONNECTION_MACHINE,
                to=hop,
                actor=actor,
                org=source.chain.org,
                action=None,
                updates=fields,
            )
        except RaceLost:
            SOURCE_TRANSITIONS.labels(
                chain=label, source=source.name, to=S(hop).label, result="race_lost"
            ).inc()
            log.info(
                "source %s/%s: lost the race to %s (another writer moved it first)",
                label,
                source.name,
                S(hop).label,
            )
            return False
        SOURCE_TRANSITIONS.labels(chain=label, source=source.name, to=S(hop).label, result="changed").inc()
        log.info(
            "source %s/%s: %s -> %s %s",
            label,
            source.name,
            before,
            S(hop).label,
            ",".join(ordered) if hop == target else "",
        )
    return True


def _gate_edge(
    source: SyncSource, *, actor: Actor, frm: ConnectionStatus, to: ConnectionStatus, what: str, message: str
) -> Chain:
    """The role of the operator edge `frm -> to` of `CONNECTION_MACHINE`, required of `actor` in the
    source's organization (a refusal is audited there); returns the source's chain with its org."""
    edge = CONNECTION_MACHINE.edge(frm, to)
    assert edge is not None
    role = Role(edge.role or Role.ADMIN)
    chain = Chain.objects.select_related("org").get(pk=source.chain_id)
    require_role(
        actor=actor,
        org=chain.org,
        role=role,
        what=what.format(source=f"{chain.slug}/{source.name}"),
        message=message.format(role=role.label),
        target=source,
    )
    return chain


def source_clear_degraded(*, source: SyncSource, actor: Actor, reason: str) -> bool:
    """An operator accepts a source's historic range failure (say, it is a pruned node by design):
    the sticky reason goes, the other reasons are recomputed by the next observation. The role is
    that of the machine's edge connected_degraded -> connected (operator), checked here. One
    transaction, one AuditEvent (with the status change when the source leaves connected_degraded)."""
    reason = clean_reason(reason)
    chain = _gate_edge(
        source,
        actor=actor,
        frm=S.CONNECTED_DEGRADED,
        to=S.CONNECTED,
        what="clear the historic range failure of {source}",
        message=CLEAR_ROLE,
    )
    with transaction.atomic():
        row = SyncSource.objects.select_for_update().get(pk=source.pk)
        row.chain = chain
        before = list(row.degraded_reasons or [])
        if DegradedReason.HISTORIC_RANGE_FAILED not in before:
            raise ValidationFailed(NOTHING_TO_CLEAR)
        reasons = [r for r in before if r != DegradedReason.HISTORIC_RANGE_FAILED]
        kept = [p for p in (row.degraded_detail or "").split("; ") if p and not RANGE_FRAGMENT.search(p)]
        detail = "; ".join(kept)
        cleared: dict[str, Any] = {"degraded_reasons": reasons, "degraded_detail": detail}
        if row.connection_status == S.CONNECTED_DEGRADED:
            # connected_degraded means partial data only: without the range failure it is connected
            # (other reasons stay as health reasons).
            transition(
                row,
                machine=CONNECTION_MACHINE,
                to=S.CONNECTED,
                actor=actor,
                org=chain.org,
                action=CLEAR_ACTION,
                reason=reason,
                updates={**cleared, "status_changed_at": clock.now()},
                audit_fields=("degraded_reasons",),
                check_role=False,
            )
            SOURCE_TRANSITIONS.labels(
                chain=chain.slug, source=row.name, to=S.CONNECTED.label, result="changed"
            ).inc()
        else:
            # The status stays (it is not connected_degraded): only the
            # reason columns, named here, while the status is the one read (never the status itself).
            SyncSource.objects.filter(pk=row.pk, connection_status=row.connection_status).update(
                degraded_reasons=reasons, degraded_detail=detail
            )
            row.degraded_reasons, row.degraded_detail = reasons, detail
            record(
                action=CLEAR_ACTION,
                actor=actor,
                org=chain.org,
                target=row,
                reason=reason,
                changes={"degraded_reasons": [before, reasons]},
            )
    source.connection_status, source.degraded_reasons = row.connection_status, row.degraded_reasons
    source.degraded_detail = row.degraded_detail
    return True


def source_reenable(*, source: SyncSource, actor: Actor, reason: str) -> bool:
    """An operator fixed what got a source refused (its DNS name, certificate, URL) and lets the
    writer try it again: refused -> disconnected (an operator edge of `CONNECTION_MACHINE`), the
    refusal reason and failure streak cleared; a running `indexer_run` takes the source back after
    its next step (it reads the source rows every step). One transaction, one AuditEvent."""
    reason = clean_reason(reason)
    chain = _gate_edge(
        source,
        actor=actor,
        frm=S.REFUSED,
        to=S.DISCONNECTED,
        what="re-enable the refused source {source}",
        message=REENABLE_ROLE,
    )
    with transaction.atomic():
        row = SyncSource.objects.select_for_update().get(pk=source.pk)
        row.chain = chain
        if row.connection_status != S.REFUSED:
            raise ValidationFailed(NOT_REFUSED)
        transition(
            row,
            machine=CONNECTION_MACHINE,
            to=S.DISCONNECTED,
            actor=actor,
            org=chain.org,
            action=REENABLE_ACTION,
            reason=reason,
            updates={
                "refused_reason": "",
                "consecutive_failures": 0,
                "first_failure_at": None,
                "next_retry_at": None,
                "status_changed_at": clock.now(),
            },
            audit_fields=("refused_reason",),
            metadata={"chain": chain.slug, "source": row.name},
            check_role=False,
        )
    SOURCE_TRANSITIONS.labels(
        chain=chain.slug, source=row.name, to=S.DISCONNECTED.label, result="changed"
    ).inc()
    source.connection_status, source.refused_reason = row.connection_status, ""
    return True
