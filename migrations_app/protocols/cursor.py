"""The protocol cursors: compare-and-swap in ONE statement, created once, rewound only by a rollback.

`cursor_cas` must run inside the transaction that writes the rows up to `new`: the UPDATE takes the
row lock, so a concurrent writer's CAS waits for this commit and then re-checks its expected value
against the committed one (READ COMMITTED re-evaluates the WHERE), which is what makes every height
belong to exactly one writer.
"""

from __future__ import annotations

import enum
import logging

from django.db import connection

from fleetops.lib import clock
from migrations_app.models import Cursor
from migrations_app.protocols.metrics import CAS_RESULTS

log = logging.getLogger(__name__)

_TABLE = Cursor._meta.db_table
# The CTE's UPDATE and the EXISTS see the same snapshot, so "missing" is decided on the row as the
# statement found it, never on a row another transaction is about to insert.
_CAS = f"""
WITH cas AS (
    UPDATE {_TABLE} SET height = %(new)s, updated_at = %(now)s
    WHERE name = %(name)s AND height = %(expected)s
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM {_TABLE} WHERE name = %(name)s), (SELECT count(*) FROM cas)
"""  # noqa: S608 - table name from the model
_CREATE = f"""
INSERT INTO {_TABLE} (name, height, updated_at) VALUES (%(name)s, %(height)s, %(now)s)
ON CONFLICT (name) DO NOTHING
"""  # noqa: S608
CURSOR_BACKWARDS = "a cursor CAS may only move forward ({expected} -> {new}); rewinds go through a rollback"


class CasResult(enum.Enum):
    SWAPPED = "swapped"
    LOST = "lost"  # the row exists with another height: the other writer owns these heights
    MISSING = "missing"  # no row: nobody produces this protocol yet (not a lost race)


def cursor_cas(*, name: str, expected: int, new: int, writer: str) -> CasResult:
    """Move `name` from `expected` to `new` (> expected) or report why not."""
    if new <= expected:
        raise ValueError(CURSOR_BACKWARDS.format(expected=expected, new=new))
    with connection.cursor() as cursor:
        cursor.execute(_CAS, {"name": name, "expected": expected, "new": new, "now": clock.now()})
        row = cursor.fetchone()
    assert row is not None
    exists, swapped = bool(row[0]), int(row[1])
    result = CasResult.SWAPPED if swapped == 1 else CasResult.LOST if exists else CasResult.MISSING
    CAS_RESULTS.labels(writer=writer, result=result.value).inc()
    if result is CasResult.MISSING:
        log.warning("cursor missing", extra={"cursor": name, "writer": writer})
    return result


def cursor_create(*, name: str, height: int) -> bool:
    """Create the cursor at `height` unless it exists (then it is left alone: resume from it)."""
    with connection.cursor() as cursor:
        cursor.execute(_CREATE, {"name": name, "height": height, "now": clock.now()})
        return cursor.rowcount == 1


def cursor_get(name: str) -> int | None:
    return Cursor.objects.filter(name=name).values_list("height", flat=True).first()


def cursors_lock(names: list[str]) -> dict[str, int]:
    """Lock the named cursor rows (in name order, so two lockers never deadlock) for a rollback."""
    rows = Cursor.objects.select_for_update().filter(name__in=names).order_by("name")
    return {c.name: c.height for c in rows}


def cursors_rewind(*, names: list[str], to_height: int) -> int:
    """A rollback moves cursors above `to_height` back to it; the only way a cursor goes back."""
    return Cursor.objects.filter(name__in=names, height__gt=to_height).update(
        height=to_height, updated_at=clock.now()
    )
