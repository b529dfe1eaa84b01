"""SEP41: fungible token transfer, mint and burn events of token contracts.

    transfer  sender, recipient, amount "<n><denom>", contract
    mint      recipient, amount, contract
    burn      sender, amount, contract

An event missing a party, the contract, or with an amount that is not a positive integer is not a
SEP41 event (the chain's own bank `transfer` events carry no `contract`, for example).
"""

from __future__ import annotations

from migrations_app.protocols.registry import Change, ProtocolSpec, parse_amount, register


def classify(event_type: str, attrs: dict[str, str]) -> Change | None:
    contract = attrs.get("contract", "")
    amount = parse_amount(attrs.get("amount"))
    if not contract or amount is None or amount <= 0:
        return None
    sender, recipient = attrs.get("sender", ""), attrs.get("recipient", "")
    if event_type == "transfer":
        if not sender or not recipient:
            return None
        return Change("transfer", sender, contract, counterparty=recipient, amount=amount)
    if event_type == "mint":
        return Change("mint", recipient, contract, amount=amount) if recipient else None
    if event_type == "burn":
        return Change("burn", sender, contract, amount=amount) if sender else None
    return None


SPEC = register(
    ProtocolSpec(
        id="SEP41",
        name="SEP-41 fungible tokens",
        event_types=frozenset({"transfer", "mint", "burn"}),
        classify=classify,
        contract_key="contract",
        current_state="balances",
    )
)
