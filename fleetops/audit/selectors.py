"""Reads of the audit log: who may see which rows, and the operator's search over them.

Search is PostgreSQL full-text search over one document per row (action, actor, target type, id
and label, request id and reason, with `.`, `_`, `:`, `-`, `/` and `@` read as spaces so
`indexer.rolled_back` is the words "indexer rolled back"). The document is an expression with a GIN
index of its own (migration 0003), so a search on millions of rows is an index lookup, never a
sequential scan; the query text below must stay identical to the indexed expression.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from django.db.models import BooleanField, Q, QuerySet
from django.db.models.expressions import RawSQL

from fleetops.access.models import ApiToken
from fleetops.access.selectors import org_ids_for_user
from fleetops.audit.models import ActorType, AuditEvent

# The columns of the search document, in the indexed order (every one is NOT NULL).
SEARCH_COLUMNS = ("action", "actor_label", "target_type", "target_id", "target_label", "request_id", "reason")
SEPARATORS = "._:-/@"
SEARCH_INDEX = "audit_search_document"
# Words are matched by prefix; more words than this are ignored (each one is an index probe).
SEARCH_MAX_WORDS = 8


def search_document_sql(table: str = "") -> str:
    """The indexed expression; `table` qualifies the columns in a query (the index has none)."""
    prefix = f'"{table}".' if table else ""
    joined = " || ' ' || ".join(f"{prefix}{column}" for column in SEARCH_COLUMNS)
    spaces = " " * len(SEPARATORS)
    return f"to_tsvector('simple'::regconfig, translate({joined}, '{SEPARATORS}', '{spaces}'))"


def search_words(text: str) -> list[str]:
    """The words of a search, split as the document is (letters and digits only, lower case)."""
    return re.findall(r"[^\W_]+", text.lower())[:SEARCH_MAX_WORDS]


def audit_search(qs: QuerySet[AuditEvent], *, text: str) -> QuerySet[AuditEvent]:
    """Rows whose document holds every word of `text` (each as a prefix: "roll" finds "rollback"
    and "rolled back"). An empty search leaves `qs` as it is."""
    words = search_words(text)
    if not words:
        return qs
    query = " & ".join(f"{word}:*" for word in words)
    # The words are letters and digits only and go in as a parameter; the SQL is the fixed document.
    matches = RawSQL(  # noqa: S611
        f"{search_document_sql(AuditEvent._meta.db_table)} @@ to_tsquery('simple'::regconfig, %s)",
        [query],
        output_field=BooleanField(),
    )
    return qs.filter(matches)


def audit_by_actor(qs: QuerySet[AuditEvent], *, actor_type: str, actor_id: str) -> QuerySet[AuditEvent]:
    """One actor's rows; a user's include what their API tokens did (index `audit_actor`)."""
    if actor_type != ActorType.USER:
        return qs.filter(actor_type=actor_type, actor_id=actor_id)
    tokens = [str(pk) for pk in ApiToken.objects.filter(user_id=actor_id).values_list("pk", flat=True)]
    return qs.filter(
        Q(actor_type=ActorType.USER, actor_id=actor_id)
        | Q(actor_type=ActorType.API_TOKEN, actor_id__in=tokens)
    )


def audit_in_range(
    qs: QuerySet[AuditEvent], *, since: datetime | None = None, until: datetime | None = None
) -> QuerySet[AuditEvent]:
    if since is not None:
        qs = qs.filter(at__gte=since)
    if until is not None:
        qs = qs.filter(at__lt=until)
    return qs


# How many of the newest rows the filters' choices come from (one index range, never the table).
RECENT_WINDOW = 2_000
RECENT_FIELDS = ("action", "target_type", "actor_type", "actor_id")


def audit_recent_values(qs: QuerySet[AuditEvent], *, window: int = RECENT_WINDOW) -> dict[str, list[Any]]:
    """Distinct values of each of RECENT_FIELDS among the newest `window` rows, in one query:
    choices for filters that never read the whole table. Process actors are `type:id` pairs."""
    newest = list(qs.order_by("-id").values_list(*RECENT_FIELDS)[:window])
    found: dict[str, set[Any]] = {name: set() for name in (*RECENT_FIELDS, "process")}
    for action, target_type, actor_type, actor_id in newest:
        found["action"].add(action)
        found["target_type"].add(target_type)
        if actor_type in (ActorType.SCHEDULER, ActorType.SYSTEM) and actor_id:
            found["process"].add(actor_id)
    return {name: sorted(v for v in values if v) for name, values in found.items()}


def audit_event_visible_to(*, user: Any) -> QuerySet[AuditEvent]:
    """Superusers see everything (including org-less events such as failed logins); members see
    their organizations' events."""
    qs = AuditEvent.objects.select_related("org")
    if getattr(user, "is_superuser", False):
        return qs
    return qs.filter(org_id__in=org_ids_for_user(user))
