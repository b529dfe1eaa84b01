"""Event types domain apps publish, registered from their `AppConfig.ready()`.

The subscription form offers these; a delivery's event type is stored as its code, so an event type
an app stops registering keeps its history."""

from __future__ import annotations

_event_types: dict[str, str] = {}


def register_event_type(code: str, label: str) -> None:
    _event_types[code] = label


def event_types() -> dict[str, str]:
    return dict(sorted(_event_types.items()))


def event_type_choices() -> list[tuple[str, str]]:
    return [(code, f"{label} ({code})") for code, label in event_types().items()]
