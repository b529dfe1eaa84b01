"""An in-memory fleet gateway for reconciler tests that need no HTTP: commands act at once,
telemetry reports each device's power from whether it mines, repeated command ids are answered
with their first answer (as the real gateway does)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from curtailment.gateway import CommandResult, GatewayError, Sample
from fleetops.lib import clock


class FakeGateway:
    def __init__(self, identifiers: Iterable[str], *, power_w: float = 3000.0) -> None:
        self.identifiers = list(identifiers)
        self.power_w = power_w
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.mining = dict.fromkeys(self.identifiers, True)
            self.answers: dict[str, CommandResult] = {}
            self.log: list[tuple[str, str, tuple[str, ...]]] = []
            self.failing = False

    def command(self, kind: str, command_id: str, identifiers: Sequence[str]) -> CommandResult:
        with self.lock:
            if self.failing:
                raise GatewayError("fake gateway: HTTP 503")
            if command_id in self.answers:
                return self.answers[command_id]
            known = [i for i in identifiers if i in self.mining]
            for identifier in known:
                self.mining[identifier] = kind == "uncurtail"
            self.log.append((kind, command_id, tuple(known)))
            answer = CommandResult(
                command_id=command_id,
                batch_id=f"batch-{len(self.answers) + 1}",
                dispatched=frozenset(known),
                skipped={i: "unknown device" for i in identifiers if i not in self.mining},
            )
            self.answers[command_id] = answer
            return answer

    def telemetry(self, identifiers: Sequence[str]) -> list[Sample]:
        with self.lock:
            return [
                Sample(
                    identifier=i,
                    taken_at=clock.now(),
                    power_w=self.power_w if self.mining[i] else 40.0,
                    hash_rate_hs=1e14 if self.mining[i] else 0.0,
                    efficiency_j_th=25.0,
                )
                for i in identifiers
                if i in self.mining
            ]

    def map_bounded(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass

    def factory(self) -> Callable[[Any], Any]:
        """A `gateway_for` for `reconcile_tick`: this gateway for every organization."""
        return lambda config: self
