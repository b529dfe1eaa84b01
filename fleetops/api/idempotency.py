"""`Idempotency-Key` for POSTs that create or command.

1. Claim: INSERT the (org, key) row as in_flight (`ON CONFLICT DO NOTHING`: one statement that
   commits at once, as requests run in autocommit), so a concurrent request with the same key sees
   it at once.
2. Someone else's row: a different fingerprint is 422; in flight is 409 (or a takeover when the
   holder went silent for IDEMPOTENCY_STALE_SECONDS); completed replays the stored response.
3. Run the view and store its response in ONE transaction: either both the effects and the stored
   response commit, or neither does. A crash between them is impossible, so a takeover of a stale
   claim never repeats effects that committed. What is stored is the response as sent: its JSON
   bytes, its status and the headers a client reads (Content-Type, Location), so a replay is
   byte-for-byte the first answer (a keyed request is always answered in JSON).
4. A view that raised or answered 5xx releases the key (deletes the row) so the client may retry.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from fleetops.access.context import resolve_org_access
from fleetops.access.models import Organization
from fleetops.access.roles import denials_outlive_rollback
from fleetops.api.models import IDEMPOTENCY_MACHINE, IdempotencyKey
from fleetops.lib import clock
from fleetops.lib.errors import Conflict, Unprocessable, ValidationFailed
from fleetops.lib.transition import transition_rows
from fleetops.observability.metrics import IDEMPOTENCY_OUTCOMES

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
# The response headers a replay repeats; the rest (request id, Vary, Allow) belong to each request.
STORED_HEADERS = ("Content-Type", "Location")
KEY_INVALID = "Idempotency-Key must be 1-255 printable ASCII characters."
KEY_IN_FLIGHT = "A request with this Idempotency-Key is still being processed; retry shortly."
KEY_REUSED = "This Idempotency-Key was already used with a different request (method, path or body)."


@dataclass(frozen=True)
class Claim:
    row_id: int
    replay: IdempotencyKey | None = None


def request_fingerprint(*, method: str, path: str, body: Any) -> str:
    canonical = json.dumps([method.upper(), path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@functools.cache
def _claim_sql() -> str:
    """INSERT … ON CONFLICT DO NOTHING RETURNING id, names from the model. A taken key inserts
    nothing and raises nothing, so the claim needs neither a transaction of its own nor (inside a
    caller's transaction) a savepoint; the ORM's create() cost more than the statement."""
    meta = IdempotencyKey._meta
    qn = connection.ops.quote_name
    column = {f.name: qn(str(f.column)) for f in meta.concrete_fields}
    columns = [column[name] for name in _CLAIM_FIELDS]
    unique = [column["org"], column["key"]]
    values = ["%s::jsonb" if name == "response_headers" else "%s" for name in _CLAIM_FIELDS]
    return (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(columns)}) VALUES ({', '.join(values)}) "  # noqa: S608
        f"ON CONFLICT ({', '.join(unique)}) DO NOTHING RETURNING {column['id']}"
    )


_CLAIM_FIELDS = (
    "org",
    "key",
    "fingerprint",
    "method",
    "path",
    "state",
    "response_headers",
    "created_at",
    "locked_at",
)


def _insert_claim(
    *, org: Organization, key: str, fingerprint: str, method: str, path: str, now: Any
) -> int | None:
    """The new row's id, or None when the (org, key) row exists."""
    params = [org.pk, key, fingerprint, method, path[:300], str(IDEMPOTENCY_MACHINE.initial), "{}", now, now]
    with connection.cursor() as cursor:
        cursor.execute(_claim_sql(), params)
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def idempotency_claim(*, org: Organization, key: str, fingerprint: str, method: str, path: str) -> Claim:
    # Requests run in autocommit (no ATOMIC_REQUESTS), so the claim below commits at once and a
    # concurrent request with the same key sees it.
    for _ in range(3):
        now = clock.now()
        row_id = _insert_claim(org=org, key=key, fingerprint=fingerprint, method=method, path=path, now=now)
        if row_id is not None:
            IDEMPOTENCY_OUTCOMES.labels(outcome="new").inc()
            return Claim(row_id=row_id)
        existing = IdempotencyKey.objects.filter(org=org, key=key).first()
        if existing is None:
            continue  # released between our INSERT and SELECT; try to claim again
        if existing.fingerprint != fingerprint:
            IDEMPOTENCY_OUTCOMES.labels(outcome="mismatch").inc()
            raise Unprocessable(KEY_REUSED, code="idempotency_key_reused")
        if existing.state == IdempotencyKey.State.COMPLETED:
            IDEMPOTENCY_OUTCOMES.labels(outcome="replayed").inc()
            return Claim(row_id=existing.pk, replay=existing)
        stale_before = now - timedelta(seconds=settings.FLEETOPS_IDEMPOTENCY_STALE_SECONDS)
        if existing.locked_at < stale_before:
            taken = IdempotencyKey.objects.filter(
                pk=existing.pk, state=IdempotencyKey.State.IN_FLIGHT, locked_at=existing.locked_at
            ).update(locked_at=now)
            if taken == 1:
                IDEMPOTENCY_OUTCOMES.labels(outcome="takeover").inc()
                return Claim(row_id=existing.pk)
        IDEMPOTENCY_OUTCOMES.labels(outcome="in_flight").inc()
        raise Conflict(KEY_IN_FLIGHT, code="idempotency_in_flight")
    IDEMPOTENCY_OUTCOMES.labels(outcome="in_flight").inc()
    raise Conflict(KEY_IN_FLIGHT, code="idempotency_in_flight")


def idempotency_release(*, row_id: int) -> None:
    IdempotencyKey.objects.filter(pk=row_id, state=IdempotencyKey.State.IN_FLIGHT).delete()


def idempotency_prune(*, older_than: timedelta | None = None) -> int:
    ttl = older_than or timedelta(hours=settings.FLEETOPS_IDEMPOTENCY_TTL_HOURS)
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=clock.now() - ttl).delete()
    return deleted


def _redacted(data: Any, fields: tuple[str, ...]) -> Any:
    if not fields or not isinstance(data, dict):
        return data
    return {k: (None if k in fields else v) for k, v in data.items()}


def _render_json(view: Any, response: Response, data: Any) -> bytes:
    """`data` as the JSON renderer sends it for this response (compact, UTF-8)."""
    renderer = JSONRenderer()
    context = {**view.get_renderer_context(), "response": response}
    return renderer.render(data, renderer.media_type, context)


def _rendered_as_json(view: Any, response: Response) -> None:
    """Render the view's response now, in JSON whatever the negotiation chose, so the bytes stored
    for replays are the bytes sent. DRF sees a rendered response and sends it as it is."""
    renderer = JSONRenderer()
    response.accepted_renderer = renderer
    response.accepted_media_type = renderer.media_type
    response.renderer_context = view.get_renderer_context()  # type: ignore[attr-defined]
    response.render()


def _stored_content(view: Any, response: HttpResponseBase, redact: tuple[str, ...]) -> bytes:
    if not isinstance(response, Response):
        return bytes(getattr(response, "content", b""))
    _rendered_as_json(view, response)
    if redact:
        return _render_json(view, response, _redacted(response.data, redact))
    return bytes(response.content)


def replay_response(row: IdempotencyKey) -> HttpResponse:
    """The stored response, as it was first sent."""
    assert row.response_status is not None
    if row.response_content is None:  # pragma: no cover - every completed row has it (constraint)
        raise ValueError(f"idempotency key {row.pk} has no stored response")
    replay = HttpResponse(bytes(row.response_content), status=row.response_status)
    for name in STORED_HEADERS:
        value = (row.response_headers or {}).get(name)
        if value is not None:
            replay[name] = value
        elif name in replay:
            del replay[name]
    replay[REPLAY_HEADER] = "true"
    return replay


ViewMethod = Callable[..., HttpResponseBase]


def idempotent(*, redact: tuple[str, ...] = ()) -> Callable[[ViewMethod], ViewMethod]:
    """Decorate a DRF view method (post/create/action). `redact` names response fields that must
    never be stored (a token's plaintext): a replay answers them as null."""

    def decorator(view_method: ViewMethod) -> ViewMethod:
        @functools.wraps(view_method)
        def wrapper(self: Any, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:
            key = request.headers.get(HEADER)
            if key is None:
                return view_method(self, request, *args, **kwargs)
            if not (1 <= len(key) <= 255) or not key.isascii() or not key.isprintable():
                raise ValidationFailed(
                    KEY_INVALID, code="invalid_idempotency_key", fields={HEADER: [KEY_INVALID]}
                )
            org = resolve_org_access(request).org
            fingerprint = request_fingerprint(
                method=request.method or "", path=request.path, body=request.data
            )
            claim = idempotency_claim(
                org=org, key=key, fingerprint=fingerprint, method=request.method or "", path=request.path
            )
            if claim.replay is not None:
                return replay_response(claim.replay)
            try:
                # A refusal audited inside the view is written after this block, so the rollback of
                # the refused request does not take its `access.denied` row with it.
                with denials_outlive_rollback(), transaction.atomic():
                    response = view_method(self, request, *args, **kwargs)
                    if response.status_code >= 500:
                        raise _ServerError(response)
                    stored = _stored_content(self, response, redact)
                    transition_rows(
                        model=IdempotencyKey,
                        machine=IDEMPOTENCY_MACHINE,
                        rows=[{"pk": claim.row_id}],
                        to=IdempotencyKey.State.COMPLETED,
                        updates={
                            "response_status": response.status_code,
                            "response_content": stored,
                            "response_headers": {
                                name: response[name] for name in STORED_HEADERS if name in response
                            },
                            "completed_at": clock.now(),
                        },
                        operation="idempotency_complete",
                    )
            except _ServerError as failed:
                idempotency_release(row_id=claim.row_id)
                return failed.response
            except BaseException:
                idempotency_release(row_id=claim.row_id)
                raise
            return response

        wrapper.idempotent = True  # type: ignore[attr-defined]
        return wrapper

    return decorator


class _ServerError(Exception):
    def __init__(self, response: HttpResponseBase):
        super().__init__("view answered 5xx")
        self.response = response
