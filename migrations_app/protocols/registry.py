"""The protocol classifiers. A protocol is one module that calls `register(...)` at import and is
listed in `PROTOCOL_MODULES`; nothing else in the app names a protocol.

A classifier is a pure function of one stored event (its type and attributes) to at most one state
change, so live ingestion (over the blocks being committed) and the backfill (over stored events)
compute exactly the same rows.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

PROTOCOL_MODULES = ("migrations_app.protocols.sep41", "migrations_app.protocols.sep50")
AMOUNT_RE = re.compile(r"^(\d{1,70})([A-Za-z][A-Za-z0-9/._-]*)?$")


class Change(NamedTuple):  # a tuple: built once per event by the backfills, cheaper than a dataclass
    kind: str
    account: str
    asset: str
    counterparty: str = ""
    amount: int | None = None
    token_id: str = ""


Classify = Callable[[str, dict[str, str]], Change | None]


@dataclass(frozen=True)
class ProtocolSpec:
    id: str
    name: str
    # Event types the classifier looks at: the backfill reads only these (an index on (chain, type)).
    event_types: frozenset[str]
    classify: Classify
    # The attribute naming the contract (token contract, NFT class) the event belongs to.
    contract_key: str
    # Which current state the protocol keeps: "balances" or "owners".
    current_state: str


_specs: dict[str, ProtocolSpec] = {}
_loaded = False


def register(spec: ProtocolSpec) -> ProtocolSpec:
    _specs[spec.id] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in PROTOCOL_MODULES:
            importlib.import_module(module)
        _loaded = True


def get(protocol_id: str) -> ProtocolSpec | None:
    _load()
    return _specs.get(protocol_id)


def all_specs() -> list[ProtocolSpec]:
    _load()
    return sorted(_specs.values(), key=lambda s: s.id)


# json.loads without its layers (about a third of its cost on a short array): the scanner itself.
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace, or not JSON (raises)
    return value if end == len(text) else json.loads(text)


def attribute_map(attributes: Iterable[Any]) -> dict[str, str]:
    """Stored attributes are `[{key, value, index}]` in node order; the first value of a key wins.
    Raw SQL hands jsonb over as text (Django's psycopg setup leaves decoding to JSONField).
    Called once per event by the backfills: kept tight."""
    if isinstance(attributes, str):
        attributes = _loads(attributes)
    elif isinstance(attributes, bytes):
        attributes = json.loads(attributes)
    out: dict[str, str] = {}
    for attr in attributes:
        if isinstance(attr, dict):
            key, value = attr.get("key"), attr.get("value")
        else:  # parse.Attribute from a block being committed
            key, value = getattr(attr, "key", None), getattr(attr, "value", None)
        if isinstance(key, str) and isinstance(value, str) and key not in out:
            out[key] = value
    return out


def parse_amount(raw: str | None) -> int | None:
    """`"1234utok"` -> 1234; anything else -> None."""
    if not raw:
        return None
    match = AMOUNT_RE.match(raw.strip())
    return int(match.group(1)) if match else None
