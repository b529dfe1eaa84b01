from __future__ import annotations

from typing import Any

from fleetops.observability.commands import TickCommand
from migrations_app.keys.verification import verify_tick


class Command(TickCommand):
    help = "Verify pending stake transactions against the chain: one pass (--once) or --loop."
    actor = "command:keys_verify"

    def tick(self, options: dict[str, Any]) -> str:
        result = verify_tick()
        return (
            f"verify: checked={result.checked} confirmed={result.confirmed} absent={result.absent} "
            f"unavailable={result.unavailable} expired={result.expired} succeeded={result.succeeded} "
            f"failed={result.failed} duration={result.duration:.3f}s"
        )
