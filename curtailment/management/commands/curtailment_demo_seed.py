from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from curtailment.services import curtailment_config_update
from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand, http_url


class Command(OperatorCommand):
    help = "Point an organization's curtailment at a fleet gateway (the demo's simulator)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", default="demo")
        parser.add_argument("--gateway-url", type=http_url, required=True)

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError("curtailment_demo_seed is for the demo (DEBUG on).")
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"no organization {options['org']!r}; run demo_seed first")
        curtailment_config_update(
            org=org,
            actor=Actor.system("curtailment_demo_seed"),
            values={"gateway_url": options["gateway_url"]},
        )
        self.stdout.write(f"{org.slug}: fleet gateway {options['gateway_url']}")
