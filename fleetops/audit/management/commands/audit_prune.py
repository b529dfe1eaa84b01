from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import CommandParser

from fleetops.audit.actors import Actor
from fleetops.audit.services import audit_prune
from fleetops.lib.commands import YES_HELP, OperatorCommand, int_between

MIN_RETENTION_DAYS = 30


class Command(OperatorCommand):
    help = "Delete audit rows older than the retention period (default AUDIT_RETENTION_DAYS, minimum 30)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than-days",
            type=int_between(MIN_RETENTION_DAYS),
            default=settings.FLEETOPS_AUDIT_RETENTION_DAYS,
            help=f"the audit log keeps a {MIN_RETENTION_DAYS}-day floor",
        )
        parser.add_argument("--yes", action="store_true", help=YES_HELP)

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["older_than_days"]
        self.confirm(f"delete every audit row older than {days} days", yes=options["yes"])
        deleted = audit_prune(older_than_days=days, actor=Actor.system("manage.py audit_prune"))
        self.stdout.write(self.style.SUCCESS(f"deleted {deleted} audit rows older than {days} days"))
