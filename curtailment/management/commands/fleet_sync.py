from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from curtailment.fleet import fleet_sync, orgs_with_gateway, telemetry_poll
from curtailment.gateway import FleetGateway, GatewayError
from fleetops.lib.commands import OperatorCommand


class Command(OperatorCommand):
    help = "Sync devices (and one round of telemetry) from the fleet gateway of each organization."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", help="organization slug (default: every organization with a gateway)")
        parser.add_argument("--no-telemetry", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        configs = [c for c in orgs_with_gateway() if not options["org"] or c.org.slug == options["org"]]
        if not configs:
            raise CommandError("no organization with a fleet gateway URL matches")
        for config in configs:
            with FleetGateway(config.gateway_url) as gateway:
                try:
                    result = fleet_sync(org=config.org, gateway=gateway)
                    samples = (
                        0 if options["no_telemetry"] else telemetry_poll(org=config.org, gateway=gateway)
                    )
                except GatewayError as exc:
                    raise CommandError(f"{config.org.slug}: {exc}")
            self.stdout.write(
                f"{config.org.slug}: {result.created} created, {result.updated} updated, "
                f"{result.deleted} removed, {samples} samples"
            )
