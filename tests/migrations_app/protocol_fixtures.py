"""Fixtures of the protocol tests: the Celery tasks the services kick by name, captured instead of
sent (`current_app.send_task(name, kwargs=...)` once the request commits)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import current_app

from fleetops.celery import app


class SentTasks(list[tuple[str, dict[str, Any]]]):
    """(task name, kwargs) of every task sent, in order."""

    def of(self, name: str) -> list[dict[str, Any]]:
        return [kwargs for sent, kwargs in self if sent == name]


@pytest.fixture
def sent_tasks(monkeypatch: pytest.MonkeyPatch) -> SentTasks:
    sent = SentTasks()

    def send_task(name: str, args: Any = None, kwargs: dict[str, Any] | None = None, **options: Any) -> None:
        sent.append((name, dict(kwargs or {})))

    # The services send through `celery.current_app`, which is this app.
    monkeypatch.setattr(app, "send_task", send_task)
    assert current_app.send_task is send_task
    return sent
