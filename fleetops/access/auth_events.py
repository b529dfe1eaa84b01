"""Audit rows for interactive logins.

Django only reports logins through its auth signals, so this is the one place the portal listens
to signals: login outcomes are security events, not domain state changes.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db import transaction

from fleetops.audit.actors import Actor
from fleetops.audit.models import PlatformAction
from fleetops.audit.services import record as _record
from fleetops.observability.metrics import LOGIN_FAILURES


def record(**kwargs: Any) -> None:
    # A login outcome is its own change: its row commits on its own transaction.
    with transaction.atomic():
        _record(**kwargs)


def _client_ip(request: Any) -> str:
    if request is None:
        return ""
    return str(request.META.get("REMOTE_ADDR", ""))


def on_login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    username = str(credentials.get("username", ""))[:150]
    LOGIN_FAILURES.inc()
    record(
        action=PlatformAction.LOGIN_FAILED,
        actor=Actor.anonymous(label=username),
        org=None,
        metadata={"username": username, "ip": _client_ip(request)},
    )


def on_logged_in(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    record(
        action=PlatformAction.LOGIN,
        actor=Actor.for_user(user),
        org=None,
        metadata={"ip": _client_ip(request)},
    )


def on_locked_out(
    sender: Any, request: Any = None, username: str = "", ip_address: str = "", **kwargs: Any
) -> None:
    record(
        action=PlatformAction.LOGIN_LOCKED_OUT,
        actor=Actor.anonymous(label=username or ""),
        org=None,
        metadata={"username": username, "ip": ip_address},
    )


def connect() -> None:
    from axes.signals import user_locked_out

    user_login_failed.connect(on_login_failed, dispatch_uid="fleetops.audit.login_failed")
    user_logged_in.connect(on_logged_in, dispatch_uid="fleetops.audit.logged_in")
    user_locked_out.connect(on_locked_out, dispatch_uid="fleetops.audit.locked_out")
