"""The transition kernel: every state change is one audited compare-and-set.

Two entry points, both reading the allowed from-states from the object's `Machine` (never from a
list typed at the call site):

`transition(obj, machine=..., to=..., actor=..., action=..., org=...)` moves one row:

1. The from-states are the object's state as the caller read it (or `expect=`, a subset); each must
   have an edge to `to` in the machine, or the call is refused with `IllegalTransition` (a 409) and
   nothing is written.
2. When the edge needs a role, the actor's role is checked *before* the transaction opens
   (`fleetops.access.roles.require_role`), so a refusal's `access.denied` row commits.
3. In one transaction: the row is locked (`SELECT … FOR UPDATE`, which also reads the before-values
   of the audited fields), the conditional `UPDATE … WHERE pk = %s AND <field> IN (<from>) [AND
   where…]` runs and its row count is checked, and the audit row is written by `record()`.
4. A row found in another state (or failing `where`) is a lost race: `RaceLost` is raised, counted
   once in `fleetops_platform_race_lost_total{operation}` and logged at debug level.

`transition_rows(model=..., machine=..., rows=[...])` is the set-based variant for the engines
(reconciler target writes, key verdicts, enrichment verdicts, delivery sends): one
`UPDATE … FROM unnest(<one array per column>)` per chunk whose WHERE admits only the machine's edges
(`state || '>' || to = ANY(edges)`), optionally also the exact from-state and other columns each row
must still match (claim tokens, attempt counters). It returns the ids that moved; the rest lost a race
and are counted once per call. It can write the batch's audit rows in the same transaction with
one INSERT (`BulkAudit`).

Counters move in the same statement: `updates={"attempts": F("attempts") + 1}` for one row,
`increments={"attempts": 1}` for a set.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper
from django.db.models.expressions import Combinable

from fleetops.access.models import Organization
from fleetops.access.roles import is_process, require_engine, require_role
from fleetops.audit.actors import Actor
from fleetops.audit.models import AuditEvent
from fleetops.audit.services import changes_between, record, record_many
from fleetops.lib.cas import note_race_lost
from fleetops.lib.errors import Conflict, NotFound, RaceLost
from fleetops.lib.machine import Machine, State, _plain
from fleetops.observability.metrics import TRANSITIONS

log = logging.getLogger(__name__)

ILLEGAL = "{name} cannot go from {source!r} to {target!r}"
MOVED_UNDER_US = "{name} {pk} is {current!r} now, not {expected}; somebody else moved it first"
ROLE_FOR_EDGE = "moving {name} from {source!r} to {target!r} needs the {role} role in the organization"
# Rows per statement of a set-based move. The statement joins its rows to the table, and PostgreSQL
# hashes every row of the table that the state condition admits once per statement: large chunks
# keep that scan to a few per move (all chunks of a move share one transaction anyway).
CHUNK = 50_000
# Columns whose Python values psycopg adapts as they are: no per-value `get_db_prep_value` call
# (10,000 rows x a few columns is most of the Python time of a set-based write otherwise).
_PLAIN_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "BigIntegerField",
        "BooleanField",
        "CharField",
        "FloatField",
        "ForeignKey",
        "IntegerField",
        "PositiveBigIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "SlugField",
        "SmallAutoField",
        "SmallIntegerField",
        "TextField",
    }
)


class IllegalTransition(Conflict):
    code = "illegal_transition"


@dataclass(frozen=True)
class Moved:
    """What one `transition` did."""

    before: State
    after: State
    changes: dict[str, list[Any]]
    audit: AuditEvent | None


def _from_states(
    machine: Machine, to: State, current: State, expect: State | Iterable[State] | None
) -> tuple[State, ...]:
    if expect is None:
        candidates: tuple[State, ...] = (_plain(current),)
    elif isinstance(expect, str | int):
        candidates = (_plain(expect),)
    else:
        candidates = tuple(_plain(s) for s in expect)
    for source in candidates:
        if not machine.can(source, to):
            raise IllegalTransition(ILLEGAL.format(name=machine.name, source=source, target=_plain(to)))
    return candidates


def authorize(
    *,
    machine: Machine,
    source: State,
    to: State,
    actor: Actor,
    org: Organization | None,
    target: models.Model | None = None,
) -> None:
    """Check that `actor` may take the edge source -> to (audited refusal otherwise). Call it
    before opening a transaction; `transition` calls it for you."""
    edge = machine.edge(source, to)
    if edge is None:
        raise IllegalTransition(ILLEGAL.format(name=machine.name, source=_plain(source), target=_plain(to)))
    what = f"{machine.name}: {edge.source} -> {edge.target}"
    if edge.role is None or (edge.engine_too and is_process(actor)):
        require_engine(actor=actor, org=org, what=what, target=target)
        return
    if org is None:
        raise ValueError(f"{machine.name}: a role-gated edge needs the object's organization")
    require_role(
        actor=actor,
        org=org,
        role=edge.role,
        what=what,
        target=target,
        message=ROLE_FOR_EDGE.format(
            name=machine.name, source=edge.source, target=edge.target, role=edge.role
        ),
    )


def transition(
    obj: models.Model,
    *,
    machine: Machine,
    to: State,
    actor: Actor,
    org: Organization | None,
    action: str | None,
    reason: str = "",
    expect: State | Iterable[State] | None = None,
    where: Mapping[str, Any] | None = None,
    updates: Mapping[str, Any] | None = None,
    audit_fields: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    check_role: bool = True,
) -> Moved:
    """Move `obj` to `to` by compare-and-set and audit it in the same transaction (see the module
    docstring). `action=None` writes no audit row (only for engine steps the machine's docs say
    are not operator-visible). `check_role=False` when the caller already authorized the edge."""
    to = _plain(to)
    state_field = machine.field
    sources = _from_states(machine, to, getattr(obj, state_field), expect)
    if check_role:
        for source in sources:
            authorize(machine=machine, source=source, to=to, actor=actor, org=org, target=obj)
    updates = dict(updates or {})
    watched = [state_field, *(f for f in audit_fields if f != state_field)]
    model = type(obj)
    operation = f"{machine.name}>{to}"
    with transaction.atomic():
        row = model._default_manager.select_for_update().filter(pk=obj.pk).values(*watched).first()
        if row is None:
            raise NotFound(f"{machine.name} {obj.pk} does not exist")
        before = row[state_field]
        if before not in sources:
            note_race_lost(operation)
            raise RaceLost(
                MOVED_UNDER_US.format(
                    name=machine.name, pk=obj.pk, current=before, expected=" or ".join(map(repr, sources))
                )
            )
        changed = model._default_manager.filter(
            pk=obj.pk, **{f"{state_field}__in": sources}, **dict(where or {})
        ).update(**{state_field: to}, **updates)
        if changed != 1:
            note_race_lost(operation)
            raise RaceLost(
                MOVED_UNDER_US.format(
                    name=machine.name, pk=obj.pk, current=before, expected="the expected row"
                )
            )
        after = {k: v for k, v in updates.items() if k in watched}
        computed = [k for k, v in after.items() if isinstance(v, Combinable)]
        if computed:
            after.update(model._default_manager.filter(pk=obj.pk).values(*computed).get())
        after[state_field] = to
        changes = changes_between({k: row[k] for k in after}, after)
        audit = None
        if action is not None:
            audit = record(
                action=action,
                actor=actor,
                org=org,
                target=obj,
                reason=reason,
                changes=changes,
                metadata=metadata,
            )
    TRANSITIONS.labels(machine=machine.name, to=str(to)).inc()
    for key, value in updates.items():
        if not isinstance(value, Combinable):
            setattr(obj, key, value)
    for key in computed:
        setattr(obj, key, after[key])
    setattr(obj, state_field, to)
    return Moved(before=before, after=to, changes=changes, audit=audit)


@dataclass(frozen=True)
class BulkAudit:
    """One audit row per moved object, written with one INSERT in the transaction of the UPDATE."""

    action: str
    actor: Actor
    org_of: Any  # callable(row) -> Organization id, or an Organization / id for all rows
    reason: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    label_of: Any = None  # callable(row) -> str, the target label
    changes_of: Any = None  # callable(row) -> {field: [before, after]}, more changed fields per row


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    f = model._meta.get_field(name)
    assert isinstance(f, models.Field)
    return f


def _col(model: type[models.Model], name: str) -> str:
    return connection.ops.quote_name(str(_field(model, name).column))


def transition_rows(
    *,
    model: type[models.Model],
    machine: Machine,
    rows: Sequence[Mapping[str, Any]],
    to: State | None = None,
    set_fields: Sequence[str] = (),
    match: Sequence[str] = (),
    updates: Mapping[str, Any] | None = None,
    increments: Mapping[str, int] | None = None,
    operation: str,
    audit: BulkAudit | None = None,
    exact_from: bool = False,
    where: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Move many rows in set-based statements; return the primary keys that moved.

    Each row is a mapping with `pk`, `to` (unless `to=` is given for all), `from` (with
    `exact_from=True`: the state the caller read, which the row must still be in), every column of
    `set_fields` (its new value) and every column of `match` (the value the row must still hold).
    `updates` are constants for every row; `increments` add to counters in the same statement;
    `where` are conditions every row must also meet (`column = value`: a claim token or an owner
    shared by the batch, when the same column is also in `set_fields`).
    Only edges of `machine` can match, so an illegal target leaves the row untouched.
    Must run inside a transaction when `audit` is given (the caller's, or one it opens itself).
    """
    if not rows:
        return []
    if audit is not None and not exact_from:
        raise ValueError(f"{operation}: an audited set-based move needs exact_from=True (each row's `from`)")
    meta = model._meta
    pk_field = meta.pk
    assert pk_field is not None
    state_col = _col(model, machine.field)
    edges = [f"{e.source}>{e.target}" for e in machine.edges]
    if to is not None:
        to = _plain(to)
        legal_from = {str(s) for s in machine.allowed_from(to)}
        if not legal_from:
            raise IllegalTransition(f"{machine.name}: nothing may enter {to!r}")
    qn = connection.ops.quote_name
    value_fields: list[tuple[str, models.Field[Any, Any]]] = [("pk", pk_field)]
    state_model_field = meta.get_field(machine.field)
    assert isinstance(state_model_field, models.Field)
    if to is None:
        value_fields.append(("to", state_model_field))
    if exact_from:
        value_fields.append(("from", state_model_field))
    for name in (*set_fields, *match):
        f = meta.get_field(name)
        assert isinstance(f, models.Field)
        value_fields.append((name, f))
    aliases = [f"c{i}" for i in range(len(value_fields))]
    alias_of = {key: alias for (key, _), alias in zip(value_fields, aliases, strict=True)}

    sets = [f"{state_col} = " + (f"v.{alias_of['to']}" if to is None else "%s")]
    set_params: list[Any] = [] if to is None else [state_model_field.get_db_prep_value(to, connection)]
    for name in set_fields:
        sets.append(f"{_col(model, name)} = v.{alias_of[name]}")
    for name, value in (updates or {}).items():
        f = meta.get_field(name)
        assert isinstance(f, models.Field)
        sets.append(f"{qn(str(f.column))} = %s")
        set_params.append(f.get_db_prep_value(value, connection))
    for name, step in (increments or {}).items():
        col = _col(model, name)
        sets.append(f"{col} = t.{col} + %s")
        set_params.append(int(step))

    pk_col = qn(str(pk_field.column))
    to_sql = f"v.{alias_of['to']}::text" if to is None else "%s::text"
    cond_params: list[Any] = ([] if to is None else [str(to)]) + [edges]
    if exact_from:
        # Each row names the state it must still be in, so the edge test reads the unnested values
        # alone and no condition but the join restricts the table: the planner walks the values and
        # fetches each row by its primary key, linear in the rows whatever the statistics say. A
        # condition on the table alone (an id list, the edge test on its state) is estimated at a
        # row or two when the statistics lag behind mass updates, and the planner then rescans
        # every value for every row it fetches — quadratic: ~1 s for 1,000 rows, minutes for 15,000.
        conds = [
            f"t.{pk_col} = v.{alias_of['pk']}",
            f"t.{state_col} = v.{alias_of['from']}",
            f"(v.{alias_of['from']}::text || '>' || {to_sql}) = ANY(%s::text[])",
        ]
    else:
        # The primary keys once more as a plain condition: the planner then fetches just these rows
        # by the primary key index, instead of every row the state condition admits. Only the
        # machine's edges match; written as an edge test for a fixed target too: a plain
        # `state IN (…)` would lead the planner to scan a state index over every live row.
        conds = [
            f"t.{pk_col} = v.{alias_of['pk']}",
            f"t.{pk_col} = ANY(%b::{pk_field.cast_db_type(connection)}[])",
            f"(t.{state_col}::text || '>' || {to_sql}) = ANY(%s::text[])",
        ]
    for name in match:
        conds.append(f"t.{_col(model, name)} IS NOT DISTINCT FROM v.{alias_of[name]}")
    for name, value in (where or {}).items():
        conds.append(f"t.{_col(model, name)} = %s")
        cond_params.append(_field(model, name).get_db_prep_value(value, connection))

    # One array parameter per column, unnested: a statement of constant size whatever the chunk,
    # cheaper to send and parse than a VALUES list with a placeholder per cell. The arrays go as
    # binary parameters (`%b`, server-side binding): no quoting of every element into the SQL text.
    arrays = ", ".join(f"%b::{f.cast_db_type(connection)}[]" for _, f in value_fields)
    sql = (
        f"UPDATE {qn(meta.db_table)} AS t SET {', '.join(sets)} "  # noqa: S608 - names from the model
        f"FROM unnest({arrays}) AS v({', '.join(aliases)}) "
        f"WHERE {' AND '.join(conds)} RETURNING t.{qn(str(pk_field.column))}"
    )
    conn = connections[DEFAULT_DB_ALIAS]
    preps = [None if f.get_internal_type() in _PLAIN_TYPES else f.get_db_prep_value for _, f in value_fields]
    moved: list[Any] = []
    requested = 0
    # One statement and no audit rows is atomic on its own: no transaction (or savepoint, inside the
    # caller's) of its own, two round trips fewer on the API's idempotent writes.
    alone = len(rows) <= CHUNK and audit is None
    with contextlib.nullcontext() if alone else transaction.atomic():
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            requested += len(chunk)
            columns: list[list[Any]] = []
            for (key, _field_of), prep in zip(value_fields, preps, strict=True):
                values = [row[key] for row in chunk]
                if key in ("to", "from"):
                    values = [_plain(v) for v in values]
                if prep is not None:
                    # None is SQL NULL, as in a model save (a JSONField would send JSON null).
                    values = _prepared(values, prep, conn)
                columns.append(values)
            with bound_cursor() as cursor:
                ids = [] if exact_from else [columns[0]]
                cursor.execute(sql, [*set_params, *columns, *ids, *cond_params])
                moved.extend(r[0] for r in cursor.fetchall())
        if audit is not None and moved:
            _bulk_audit(audit, machine=machine, model=model, rows=rows, moved=moved, to=to)
    if len(moved) != requested:
        note_race_lost(operation, expected=requested, changed=len(moved))
    if moved:
        if to is not None:
            TRANSITIONS.labels(machine=machine.name, to=str(to)).inc(len(moved))
        else:
            moved_set = set(moved)
            counts: dict[str, int] = {}
            for row in rows:
                if row["pk"] in moved_set:
                    key = str(_plain(row["to"]))
                    counts[key] = counts.get(key, 0) + 1
            for key, n in counts.items():
                TRANSITIONS.labels(machine=machine.name, to=key).inc(n)
    return moved


def _prepared(values: list[Any], prep: Any, conn: Any) -> list[Any]:
    """`prep` of each value, once per distinct hashable value: a batch shares a few timestamps, and
    a DateTimeField's preparation costs more than the rest of the row."""
    seen: dict[Any, Any] = {}
    out: list[Any] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            hit = seen.get(v, seen)
        except TypeError:  # unhashable (a dict for a JSONField): prepared every time
            out.append(prep(v, conn))
            continue
        if hit is seen:
            hit = seen[v] = prep(v, conn)
        out.append(hit)
    return out


def bound_cursor() -> CursorWrapper:
    """A Django cursor (execute wrappers, query log, error translation) over a psycopg cursor that
    binds parameters on the server. The project's connections bind on the client, which splices
    every array element, quoted, into the SQL text: at 20,000 rows x 4 columns that costs ~5x the
    binary parameters this cursor can send."""
    db = connections[DEFAULT_DB_ALIAS]
    db.ensure_connection()
    db.validate_thread_sharing()
    raw = psycopg.Cursor(db.connection)
    return CursorDebugWrapper(raw, db) if db.queries_logged else CursorWrapper(raw, db)


def _bulk_audit(
    audit: BulkAudit,
    *,
    machine: Machine,
    model: type[models.Model],
    rows: Sequence[Mapping[str, Any]],
    moved: list[Any],
    to: State | None,
) -> None:
    moved_set = set(moved)
    target_type = f"{model._meta.app_label}.{model._meta.model_name}"
    entries = []
    for row in rows:
        if row["pk"] not in moved_set:
            continue
        target = _plain(row["to"]) if to is None else to
        # The trail must replay: an audited move names the state it left (`exact_from` rows).
        changes = {machine.field: [_plain(row["from"]), target]}
        if audit.changes_of is not None:
            changes.update(audit.changes_of(row))
        org = audit.org_of(row) if callable(audit.org_of) else audit.org_of
        entries.append(
            {
                "org_id": org.pk if isinstance(org, Organization) else org,
                "target_type": target_type,
                "target_id": str(row["pk"]),
                "target_label": (audit.label_of(row) if audit.label_of else str(row["pk"])),
                "changes": changes,
            }
        )
    record_many(
        action=audit.action, actor=audit.actor, reason=audit.reason, metadata=audit.metadata, entries=entries
    )
