"""Is the caller inside a transaction it opened? The rule behind "written in the transaction of the
change" (audit rows, outbox messages): refused in autocommit, where a crash between two statements
leaves one without the other."""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections


def in_transaction(using: str = DEFAULT_DB_ALIAS) -> bool:
    """True inside `transaction.atomic()`. The test suite wraps each test in atomic blocks marked
    `_from_testcase`; they do not count, or every test would pass whether the code under test
    opened its transaction or not."""
    return any(not getattr(block, "_from_testcase", False) for block in connections[using].atomic_blocks)
