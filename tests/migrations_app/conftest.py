"""Fixtures of the key lifecycle tests (the chain simulator, the org wired to it, a webhook
receiver) live in keys_fixtures.py; importing them here makes them visible to this directory."""

from __future__ import annotations

from tests.migrations_app.keys_fixtures import chain, receiver, wired
from tests.migrations_app.protocol_fixtures import sent_tasks

__all__ = ["chain", "receiver", "sent_tasks", "wired"]
