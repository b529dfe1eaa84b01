"""SEP50: non-fungible token transfer and mint events of NFT classes.

nft_transfer  sender, recipient, class_id, token_id
nft_mint      recipient, class_id, token_id
"""

from __future__ import annotations

from migrations_app.protocols.registry import Change, ProtocolSpec, register


def classify(event_type: str, attrs: dict[str, str]) -> Change | None:
    class_id, token_id = attrs.get("class_id", ""), attrs.get("token_id", "")
    recipient = attrs.get("recipient", "")
    if not class_id or not token_id or not recipient:
        return None
    if event_type == "nft_transfer":
        sender = attrs.get("sender", "")
        if not sender:
            return None
        return Change("transfer", sender, class_id, counterparty=recipient, token_id=token_id)
    if event_type == "nft_mint":
        return Change("mint", recipient, class_id, token_id=token_id)
    return None


SPEC = register(
    ProtocolSpec(
        id="SEP50",
        name="SEP-50 non-fungible tokens",
        event_types=frozenset({"nft_transfer", "nft_mint"}),
        classify=classify,
        contract_key="class_id",
        current_state="owners",
    )
)
