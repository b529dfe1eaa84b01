"""Per-request / per-task context (request id, actor label) carried in contextvars so logs and
audit rows written anywhere below a request or a task share the same id."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("fleetops_request_id", default="")
actor_var: ContextVar[str] = ContextVar("fleetops_actor", default="")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id() -> str:
    return uuid.uuid4().hex


def sanitize_request_id(candidate: str | None) -> str:
    """Accept a caller's id only when it is short and harmless to log; otherwise make one."""
    if candidate and _VALID_REQUEST_ID.match(candidate):
        return candidate
    return new_request_id()


def current_request_id() -> str:
    return request_id_var.get()


@contextlib.contextmanager
def bound(*, request_id: str | None = None, actor: str | None = None) -> Iterator[str]:
    """Bind a request id (and actor label) for the duration of a block: tasks, commands, loops."""
    rid = request_id or new_request_id()
    token = request_id_var.set(rid)
    actor_token = actor_var.set(actor) if actor is not None else None
    try:
        yield rid
    finally:
        request_id_var.reset(token)
        if actor_token is not None:
            actor_var.reset(actor_token)
