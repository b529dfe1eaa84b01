from __future__ import annotations

from typing import Any

from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand
from fleetops.observability.sync import schedules_sync


class Command(OperatorCommand):
    help = "Upsert the schedules declared in code into Celery beat's tables (keeps operator pauses)."

    def handle(self, *args: Any, **options: Any) -> None:
        result = schedules_sync(actor=Actor.system("schedules_sync"))
        for label, names in (("created", result.created), ("updated", result.updated)):
            for name in names:
                self.stdout.write(f"{label}: {name}")
        self.stdout.write(
            self.style.SUCCESS(
                f"schedules: {len(result.created)} created, {len(result.updated)} updated, "
                f"{len(result.unchanged)} unchanged"
            )
        )
