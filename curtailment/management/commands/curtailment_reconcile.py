from __future__ import annotations

from typing import Any

from curtailment.reconciler import reconcile_tick
from fleetops.observability.commands import TickCommand


class Command(TickCommand):
    help = "Run the curtailment reconciler: one tick (--once) or a tick every --interval seconds (--loop)."
    actor = "command:curtailment_reconcile"

    def tick(self, options: dict[str, Any]) -> str:
        result = reconcile_tick()
        return (
            f"tick: ran={result.ran} live_events={result.live_events} failures={result.failures} "
            f"races_lost={result.races_lost} duration={result.duration:.3f}s"
        )
