from __future__ import annotations

import json
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django.db import transaction

from fleetops.access.models import Membership, Organization, Role
from fleetops.lib.commands import OperatorCommand

DEMO_USERS = {
    "demo-viewer": Role.VIEWER,
    "demo-operator": Role.OPERATOR,
    "demo-admin": Role.ADMIN,
}
SUPERUSER = "demo-superuser"


class Command(OperatorCommand):
    help = "Create the demo organization and one user per role (idempotent; prints the passwords)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--allow-production", action="store_true", help="seed even when DEBUG is off")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG and not options["allow_production"]:
            raise CommandError("demo_seed creates users with known passwords; it runs only with DEBUG on.")
        path = settings.VAR_DIR / "demo_credentials.json"
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        creds: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        user_model = get_user_model()
        with transaction.atomic():
            org, _ = Organization.objects.get_or_create(slug="demo", defaults={"name": "Demo Fleet Co"})
            for username in [*DEMO_USERS, SUPERUSER]:
                password = creds.setdefault(username, secrets.token_urlsafe(12))
                user, created = user_model.objects.get_or_create(username=username)
                user.is_staff = True
                user.is_superuser = username == SUPERUSER
                if created or not user.check_password(password):
                    user.set_password(password)
                user.save()
                if username in DEMO_USERS:
                    Membership.objects.update_or_create(
                        user=user, org=org, defaults={"role": DEMO_USERS[username]}
                    )
        path.write_text(json.dumps(creds, indent=2))
        path.chmod(0o600)
        self.stdout.write(self.style.SUCCESS(f"Demo organization: {org.name} (slug {org.slug})"))
        self.stdout.write("Demo users (log in at /admin/):")
        for username in [*DEMO_USERS, SUPERUSER]:
            role = DEMO_USERS.get(username, "superuser")
            self.stdout.write(f"    {username:<16} {role:<10} password: {creds[username]}")
