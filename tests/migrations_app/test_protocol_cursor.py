"""The cursor CAS: one statement, swapped / lost / missing, and exactly one winner between two
connections racing for the same heights."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from migrations_app.models import Cursor
from migrations_app.protocols.cursor import CasResult, cursor_cas, cursor_create, cursor_get, cursors_rewind
from migrations_app.protocols.metrics import CAS_RESULTS


def count(writer: str, result: str) -> float:
    return CAS_RESULTS.labels(writer=writer, result=result)._value.get()


@pytest.mark.django_db
def test_it_swaps_loses_and_reports_a_missing_row_separately():
    missing_before = count("t", "missing")
    assert cursor_cas(name="c", expected=0, new=1, writer="t") is CasResult.MISSING
    assert count("t", "missing") == missing_before + 1
    assert cursor_create(name="c", height=9) is True
    assert cursor_create(name="c", height=0) is False  # an existing cursor is resumed, never reset
    assert cursor_cas(name="c", expected=9, new=12, writer="t") is CasResult.SWAPPED
    assert cursor_cas(name="c", expected=9, new=13, writer="t") is CasResult.LOST
    assert cursor_get("c") == 12


@pytest.mark.django_db
def test_it_never_moves_backwards_except_by_a_rollback_rewind():
    cursor_create(name="c", height=10)
    with pytest.raises(ValueError):
        cursor_cas(name="c", expected=10, new=10, writer="t")
    with pytest.raises(ValueError):
        cursor_cas(name="c", expected=10, new=5, writer="t")
    assert cursors_rewind(names=["c"], to_height=12) == 0  # only cursors above the fork point move
    assert cursors_rewind(names=["c"], to_height=7) == 1
    assert cursor_get("c") == 7


@pytest.mark.django_db(transaction=True)
def test_two_connections_racing_for_the_same_heights_have_exactly_one_winner():
    Cursor.objects.all().delete()
    cursor_create(name="race", height=100)
    barrier = threading.Barrier(2)
    results: list[CasResult] = []
    hold = threading.Event()

    def writer(new: int, wait: bool) -> None:
        try:
            with transaction.atomic():
                barrier.wait()
                if not wait:
                    result = cursor_cas(name="race", expected=100, new=new, writer="t")
                    hold.set()
                    threading.Event().wait(0.2)  # keep the row locked while the other one tries
                else:
                    hold.wait()
                    result = cursor_cas(name="race", expected=100, new=new, writer="t")
                results.append(result)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=writer, args=(110, False)),
        threading.Thread(target=writer, args=(101, True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.value for r in results) == ["lost", "swapped"]
    assert cursor_get("race") == 110
