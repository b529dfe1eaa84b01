"""Models of the migrations app: the key re-stake lifecycle (`keys`, seed 000) and the protocol
history migration (`protocols`, seed 003)."""

from __future__ import annotations

from migrations_app.models.keys import *  # noqa: F403
from migrations_app.models.protocols import *  # noqa: F403
