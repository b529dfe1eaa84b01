from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from fleetops.audit.actors import Actor
from fleetops.audit.services import audit_prune


class Command(BaseCommand):
    help = "Delete audit rows older than the retention period (default AUDIT_RETENTION_DAYS, minimum 30)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than-days", type=int, default=settings.FLEETOPS_AUDIT_RETENTION_DAYS)

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["older_than_days"]
        if days < 30:
            from django.core.management.base import CommandError

            raise CommandError("--older-than-days must be at least 30; the audit log keeps a 30-day floor.")
        deleted = audit_prune(older_than_days=days, actor=Actor.system("manage.py audit_prune"))
        self.stdout.write(self.style.SUCCESS(f"deleted {deleted} audit rows older than {days} days"))
