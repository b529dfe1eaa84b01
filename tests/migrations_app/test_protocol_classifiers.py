"""The SEP41 / SEP50 classifiers and the registry, as pure functions of one event."""

from __future__ import annotations

from migrations_app.protocols import registry
from migrations_app.protocols.registry import Change, attribute_map, parse_amount


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
