"""B6's raw baseline: a minimal WSGI app (psycopg, no Django) serving what B6 asks of the portal.

    GET  /api/v1/indexer/chains/<slug>/events[?cursor=]      the keyset page, newest first
    POST /api/v1/indexer/chains/<slug>/enrichments/requeue   with Idempotency-Key: insert-or-replay
    GET  /health/ready                                       SELECT 1

It does the work a correct implementation cannot skip, and nothing else:

1. Authenticate the bearer token: one query (token, owner, membership), SHA-256 of the secret,
   revoked / expired / inactive checks, `last_used_at` written at most once a minute.
2. The chain of the token's organization: one query (another org's chain is a 404).
3. Reads: the keyset query on (chain_id, id), rows as JSON; the cursor is the last id with an HMAC
   bound to the organization and the path, so a tampered cursor is a 400.
4. Writes, with the portal's idempotency-table semantics on the same table: claim the key by INSERT
   in its own transaction (ON CONFLICT: same fingerprint and completed -> replay the stored bytes,
   different fingerprint -> 422, in flight -> 409, stale -> takeover); then, in ONE transaction, the
   requeue's selection of re-queueable rows and the stored response. The benchmark's ids never
   match a re-queueable row (it checks that none exists), so the set-based move and its audit row
   are not part of this baseline.

No state or role literal lives here: the benchmark passes the machine's values in the environment
(B6_ROLES low to high, B6_REQUEUE_ROLE, B6_REQUEUEABLE, B6_IDEMPOTENCY_STATES in_flight,completed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import psycopg

EVENT_FIELDS = ("id", "height", "phase", "tx_index", "event_index", "type", "attributes")
PAGE_SIZE = int(os.environ.get("API_PAGE_SIZE", "50"))
STALE = timedelta(seconds=int(os.environ.get("IDEMPOTENCY_STALE_SECONDS", "300")))
TOUCH_EVERY = timedelta(minutes=1)
SECRET = os.environ.get("SECRET_KEY", "").encode()
ROLES = tuple(os.environ.get("B6_ROLES", "").split(","))
REQUEUE_ROLE = os.environ.get("B6_REQUEUE_ROLE", "")
REQUEUEABLE = list(filter(None, os.environ.get("B6_REQUEUEABLE", "").split(",")))
IN_FLIGHT, COMPLETED = [*os.environ.get("B6_IDEMPOTENCY_STATES", ",").split(","), "", ""][:2]
EVENTS_PATH = re.compile(r"^/api/v1/indexer/chains/(?P<slug>[-\w]+)/events$")
REQUEUE_PATH = re.compile(r"^/api/v1/indexer/chains/(?P<slug>[-\w]+)/enrichments/requeue$")

TOKEN_SQL = (
    "SELECT t.id, t.org_id, t.role, t.secret_hash, t.revoked_at, t.expires_at, t.last_used_at,"
    " u.is_active, u.is_superuser, m.role"
    " FROM access_apitoken t JOIN auth_user u ON u.id = t.user_id"
    " LEFT JOIN access_membership m ON m.user_id = t.user_id AND m.org_id = t.org_id"
    " WHERE t.key_id = %s"
)
CHAIN_SQL = "SELECT id FROM indexer_chain WHERE org_id = %s AND slug = %s"
PAGE_SQL = f"SELECT {', '.join(EVENT_FIELDS)} FROM indexer_event WHERE chain_id = %s"
CLAIM_SQL = (
    "INSERT INTO api_idempotencykey (org_id, key, fingerprint, method, path, state, response_headers,"
    " created_at, locked_at) VALUES (%s, %s, %s, %s, %s, %s, '{}', %s, %s)"
    " ON CONFLICT (org_id, key) DO NOTHING RETURNING id"
)
EXISTING_SQL = (
    "SELECT id, fingerprint, state, response_status, response_content, response_headers, locked_at"
    " FROM api_idempotencykey WHERE org_id = %s AND key = %s"
)
COMPLETE_SQL = (
    "UPDATE api_idempotencykey SET state = %s, response_status = %s, response_content = %s,"
    " response_headers = %s, completed_at = %s WHERE id = %s AND state = %s"
)

_local = threading.local()


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _conn() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
        _local.conn = conn
    return conn


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def sign_cursor(org_id: int, path: str, last_id: int, *, secret: bytes = SECRET) -> str:
    """The next page's cursor: the last id, with an HMAC bound to the organization and the path."""
    mac = hmac.new(secret, f"{org_id}|{path}|{last_id}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{last_id}.{mac}"


def _unsign(org_id: int, path: str, raw: str) -> int:
    value, _, _mac = raw.partition(".")
    if not value.isdigit() or not hmac.compare_digest(sign_cursor(org_id, path, int(value)), raw):
        raise HttpError(400, "invalid_cursor", "The cursor is invalid or was tampered with.")
    return int(value)


def _authenticate(conn: psycopg.Connection[Any], environ: dict[str, Any], needs: str) -> int:
    """The token's organization, or 401/403; the effective role is the lower of token and member."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    keyword, _, raw = header.partition(" ")
    prefix, _, rest = raw.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    if keyword != "Bearer" or prefix != "fo" or not key_id or not secret:
        raise HttpError(401, "not_authenticated", "Invalid API token.")
    row = conn.execute(TOKEN_SQL, [key_id]).fetchone()
    digest = hashlib.sha256(secret.encode()).hexdigest()
    if row is None or not hmac.compare_digest(row[3], digest):
        raise HttpError(401, "authentication_failed", "Invalid API token.")
    token_id, org_id, token_role, _, revoked_at, expires_at, last_used_at, active, superuser, member = row
    now = datetime.now(UTC)
    if revoked_at is not None or (expires_at is not None and expires_at <= now):
        raise HttpError(401, "authentication_failed", "This API token is no longer valid.")
    member_role = ROLES[-1] if superuser else member
    if not active or member_role is None:
        raise HttpError(401, "authentication_failed", "The owner of this API token is not a member.")
    if last_used_at is None or now - last_used_at >= TOUCH_EVERY:
        conn.execute("UPDATE access_apitoken SET last_used_at = %s WHERE id = %s", [now, token_id])
    role = min(ROLES.index(token_role), ROLES.index(member_role))
    if role < ROLES.index(needs):
        raise HttpError(403, "permission_denied", "Your role does not allow this.")
    return int(org_id)


def _chain(conn: psycopg.Connection[Any], org_id: int, slug: str) -> int:
    row = conn.execute(CHAIN_SQL, [org_id, slug]).fetchone()
    if row is None:
        raise HttpError(404, "not_found", "Not found.")
    return int(row[0])


def _events(environ: dict[str, Any], slug: str) -> tuple[int, bytes, list[tuple[str, str]]]:
    conn = _conn()
    org_id = _authenticate(conn, environ, ROLES[0])
    chain_id = _chain(conn, org_id, slug)
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if cursor := query.get("cursor", [""])[0]:
        before = _unsign(org_id, path, cursor)
        sql, params = PAGE_SQL + " AND id < %s ORDER BY id DESC LIMIT %s", [chain_id, before, PAGE_SIZE + 1]
    else:
        sql, params = PAGE_SQL + " ORDER BY id DESC LIMIT %s", [chain_id, PAGE_SIZE + 1]
    rows = conn.execute(sql, params).fetchall()
    results = [dict(zip(EVENT_FIELDS, row, strict=True)) for row in rows[:PAGE_SIZE]]
    next_cursor = next_url = None
    if len(rows) > PAGE_SIZE:
        next_cursor = sign_cursor(org_id, path, results[-1]["id"])
        scheme = environ.get("HTTP_X_FORWARDED_PROTO") or environ["wsgi.url_scheme"]
        next_url = f"{scheme}://{environ.get('HTTP_HOST', '')}{path}?cursor={next_cursor}"
    body = _dumps({"results": results, "next_cursor": next_cursor, "next": next_url})
    return 200, body, [("Content-Type", "application/json")]


def _fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _requeue(environ: dict[str, Any], slug: str) -> tuple[int, bytes, list[tuple[str, str]]]:
    conn = _conn()
    org_id = _authenticate(conn, environ, REQUEUE_ROLE)
    chain_id = _chain(conn, org_id, slug)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        data = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        raise HttpError(400, "parse_error", "Malformed JSON.")
    ids: Any = data.get("ids") if isinstance(data, dict) else None
    reason: Any = data.get("reason") if isinstance(data, dict) else None
    valid_ids = isinstance(ids, list) and ids and all(type(i) is int and i >= 1 for i in ids)
    if not valid_ids or not isinstance(reason, str) or not reason.strip():
        raise HttpError(400, "invalid", "ids (positive integers) and a reason are required.")
    key = environ.get("HTTP_IDEMPOTENCY_KEY")
    path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
    if key is None:
        return _requeue_effect(conn, chain_id, ids)
    now = datetime.now(UTC)
    fingerprint = _fingerprint(method, path, data)
    claimed = conn.execute(
        CLAIM_SQL, [org_id, key, fingerprint, method, path, IN_FLIGHT, now, now]
    ).fetchone()
    if claimed is not None:
        row_id = claimed[0]
    else:
        outcome = _existing(conn, org_id, key, fingerprint, now)
        if isinstance(outcome, tuple):
            return outcome
        row_id = outcome  # a stale claim taken over
    try:
        with conn.transaction():
            status, body, headers = _requeue_effect(conn, chain_id, ids)
            conn.execute(
                COMPLETE_SQL,
                [COMPLETED, status, body, json.dumps(dict(headers)), datetime.now(UTC), row_id, IN_FLIGHT],
            )
    except BaseException:
        conn.execute("DELETE FROM api_idempotencykey WHERE id = %s AND state = %s", [row_id, IN_FLIGHT])
        raise
    return status, body, headers


def _existing(
    conn: psycopg.Connection[Any], org_id: int, key: str, fingerprint: str, now: datetime
) -> tuple[int, bytes, list[tuple[str, str]]] | int:
    """Someone else's claim: the replay, 422, 409, or its id once a stale one is taken over."""
    row = conn.execute(EXISTING_SQL, [org_id, key]).fetchone()
    if row is None:
        raise HttpError(409, "idempotency_in_flight", "Released meanwhile; retry.")
    row_id, stored_fingerprint, state, status, content, headers, locked_at = row
    if stored_fingerprint != fingerprint:
        raise HttpError(422, "idempotency_key_reused", "This Idempotency-Key was used for another request.")
    if state == COMPLETED:
        return status, bytes(content), [*headers.items(), ("Idempotent-Replayed", "true")]
    if locked_at < now - STALE:
        taken = conn.execute(
            "UPDATE api_idempotencykey SET locked_at = %s WHERE id = %s AND state = %s AND locked_at = %s",
            [now, row_id, IN_FLIGHT, locked_at],
        )
        if taken.rowcount == 1:
            return int(row_id)
    raise HttpError(409, "idempotency_in_flight", "A request with this Idempotency-Key is in flight.")


def _requeue_effect(
    conn: psycopg.Connection[Any], chain_id: int, ids: list[int]
) -> tuple[int, bytes, list[tuple[str, str]]]:
    found = conn.execute(
        "SELECT id, status FROM indexer_enrichment WHERE chain_id = %s AND status = ANY(%s)"
        " AND id = ANY(%s) ORDER BY id",
        [chain_id, REQUEUEABLE, ids],
    ).fetchall()
    if found:
        raise HttpError(500, "baseline_scope", "The baseline does not move rows (see the docstring).")
    return 200, _dumps({"requeued": 0}), [("Content-Type", "application/json")]


def _ready(environ: dict[str, Any]) -> tuple[int, bytes, list[tuple[str, str]]]:
    _conn().execute("SELECT 1")
    return 200, b'{"status":"ok"}', [("Content-Type", "application/json")]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
    try:
        if method == "GET" and (match := EVENTS_PATH.match(path)):
            status, body, headers = _events(environ, match["slug"])
        elif method == "POST" and (match := REQUEUE_PATH.match(path)):
            status, body, headers = _requeue(environ, match["slug"])
        elif method == "GET" and path == "/health/ready":
            status, body, headers = _ready(environ)
        else:
            raise HttpError(404, "not_found", "Not found.")
    except HttpError as error:
        status = error.status
        body = _dumps({"error": {"code": error.code, "message": error.message, "fields": {}}})
        headers = [("Content-Type", "application/json")]
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    start_response(f"{status} {reason.get(status, 'Error')}", [*headers, ("Content-Length", str(len(body)))])
    return [body]
