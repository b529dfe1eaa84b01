from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser

from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand, id_list
from fleetops.lib.errors import DomainError
from fleetops.lib.reason import clean_reason
from migrations_app.keys.services import keys_migration_retry
from migrations_app.models.keys import KEY_MIGRATION_GIVEN_UP, Key

COMMAND = "keys_retry"


class Command(OperatorCommand):
    help = (
        "Manual retry of failed or retrying key migrations: --org SLUG --reason TEXT "
        "(--ids 1,2,3 | --all-failed), as the named operator (--user USERNAME, their role in the "
        "organization applies) or, without --user, as the system actor `keys_retry` (shell access)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", required=True)
        parser.add_argument("--user", help="act as this user (the audit log names them); default: system")
        parser.add_argument("--reason", required=True)
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--ids", type=id_list, help="comma-separated key ids")
        which.add_argument("--all-failed", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError("no such organization")
        actor = Actor.system(COMMAND)
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError("no such user")
            actor = Actor.for_user(user, interactive=False)
        try:
            reason = clean_reason(options["reason"])
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        if options["all_failed"]:
            ids = list(
                Key.objects.filter(org=org, migration_status__in=KEY_MIGRATION_GIVEN_UP).values_list(
                    "pk", flat=True
                )
            )
        else:
            ids = options["ids"]
        try:
            result = keys_migration_retry(org=org, actor=actor, key_ids=ids, reason=reason)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"retried {len(result.retried)} key(s); skipped {len(result.skipped)}")
        for pk, why in sorted(result.skipped.items()):
            self.stdout.write(f"  skipped {pk}: {why}")
