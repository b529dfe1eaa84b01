"""The SEP41 / SEP50 classifiers and the registry, as pure functions of one event; the classification
of stored events into rows, in process and in the parallel backfill's worker processes."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from migrations_app.protocols import registry
from migrations_app.protocols.classify import EventTuple, classify_events
from migrations_app.protocols.parallel import ClassifyPool
from migrations_app.protocols.registry import Change, ProtocolSpec, attribute_map, parse_amount
from tests.processes import ROOT


def attrs(**values: str) -> dict[str, str]:
    return values


def test_the_registry_knows_both_protocols_and_nothing_else():
    assert [s.id for s in registry.all_specs()] == ["SEP41", "SEP50"]
    assert registry.get("SEP99") is None


def test_sep41_turns_transfer_mint_and_burn_into_changes():
    classify = registry.get("SEP41").classify
    assert classify("transfer", attrs(sender="a", recipient="b", amount="12utok", contract="tok1")) == Change(
        "transfer", "a", "tok1", counterparty="b", amount=12
    )
    assert classify("mint", attrs(recipient="b", amount="5utok", contract="tok1")) == Change(
        "mint", "b", "tok1", amount=5
    )
    assert classify("burn", attrs(sender="a", amount="7", contract="tok1")) == Change(
        "burn", "a", "tok1", amount=7
    )


def test_sep41_rejects_bank_transfers_and_malformed_amounts():
    classify = registry.get("SEP41").classify
    assert classify("transfer", attrs(sender="a", recipient="b", amount="12utok")) is None  # no contract
    assert classify("transfer", attrs(sender="a", recipient="b", amount="lots", contract="t")) is None
    assert classify("transfer", attrs(sender="", recipient="b", amount="1utok", contract="t")) is None
    assert classify("mint", attrs(recipient="b", amount="0utok", contract="t")) is None
    assert classify("coinbase", attrs(minter="m", amount="1utok", contract="t")) is None


def test_sep50_turns_nft_transfer_and_mint_into_changes():
    classify = registry.get("SEP50").classify
    assert classify("nft_mint", attrs(recipient="b", class_id="punks", token_id="1")) == Change(
        "mint", "b", "punks", token_id="1"
    )
    assert classify(
        "nft_transfer", attrs(sender="b", recipient="c", class_id="punks", token_id="1")
    ) == Change("transfer", "b", "punks", counterparty="c", token_id="1")
    assert classify("nft_transfer", attrs(recipient="c", class_id="punks", token_id="1")) is None


def test_stored_attributes_keep_the_first_value_of_a_key():
    stored = [
        {"key": "amount", "value": "1utok", "index": True},
        {"key": "amount", "value": "2utok", "index": True},
    ]
    assert attribute_map(stored) == {"amount": "1utok"}
    assert parse_amount("1234utok") == 1234
    assert parse_amount("12.5utok") is None


def _first_string_values(attributes: list[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for a in attributes:
        if isinstance(a, dict) and isinstance(a.get("key"), str) and isinstance(a.get("value"), str):
            out.setdefault(a["key"], a["value"])
    return out


_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_attribute = st.fixed_dictionaries(
    {"key": st.sampled_from(["amount", "sender", "contract"]) | _scalar, "value": _scalar},
    optional={"index": st.booleans()},
)


@given(st.lists(_attribute | _scalar, max_size=8), st.sampled_from(["", " ", "\n  "]))
def test_stored_attributes_read_the_same_as_text_and_as_decoded_json(attributes, padding):
    text = padding + json.dumps(attributes) + padding
    assert attribute_map(text) == attribute_map(attributes) == _first_string_values(attributes)


def _spec(protocol_id: str) -> ProtocolSpec:
    spec = registry.get(protocol_id)
    assert spec is not None
    return spec


def _events(n: int) -> list[EventTuple]:
    """Stored-event tuples in no particular order: SEP41 and SEP50 events (some not classifiable),
    in every phase, with jsonb as the text raw SQL hands over."""
    rng = random.Random(7)
    phases = ["begin_block", "tx", "end_block", "finalize_block"]
    events: list[EventTuple] = []
    for i in range(n):
        height, phase = 1 + i // 20, phases[i % 4]
        tx_index = i % 3 if phase == "tx" else None
        kind = ["transfer", "mint", "burn", "nft_transfer", "nft_mint"][i % 5]
        attrs = [
            {"key": "sender", "value": f"a{i % 7}"},
            {"key": "recipient", "value": f"a{i % 11}"},
            {"key": "amount", "value": f"{i % 13}utok"},  # 0 is not a SEP41 amount
            {"key": "contract", "value": f"tok{i % 2}"},
            {"key": "class_id", "value": "punks"},
            {"key": "token_id", "value": str(i)},
        ]
        events.append((height, phase, tx_index, i, kind, json.dumps(attrs)))
    rng.shuffle(events)
    return events


def test_rows_come_out_in_chain_order_whatever_order_the_events_came_in():
    events = _events(400)
    spec = _spec("SEP41")
    rows = classify_events(spec, events)
    assert rows == classify_events(spec, sorted(events, key=lambda e: e[3]))
    rank = {"begin_block": 0, "tx": 1, "end_block": 2, "finalize_block": 3}
    keys = [(r.height, rank[r.phase], -1 if r.tx_index is None else r.tx_index, r.event_index) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert 0 < len(rows) < 400 and {r.kind for r in rows} == {"transfer", "mint", "burn"}


def test_the_worker_processes_classify_exactly_as_in_process():
    events = _events(3000)
    # A spec registered at run time (not importable by id in a fresh process) travels by value.
    specs = [_spec("SEP41"), _spec("SEP50"), dataclasses.replace(_spec("SEP41"), id="SEP41-copy")]
    pool = ClassifyPool(2)
    try:
        got = [pool.classify(specs, events[:1500]), pool.classify(specs, events[1500:])]
    finally:
        pool.close()
    assert got == [[classify_events(s, part) for s in specs] for part in (events[:1500], events[1500:])]
    assert all(got[0]) and got[0][0] == got[0][2]


def test_the_classification_module_loads_no_django():
    """What the worker processes import: the classifiers, and no ORM (they never touch the database)."""
    probe = (
        "import sys; from migrations_app.protocols import classify; "
        "assert [s.id for s in classify.registry.all_specs()] == ['SEP41', 'SEP50']; "
        "print(sorted(m for m in sys.modules if m == 'django' or m.startswith('django.')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
