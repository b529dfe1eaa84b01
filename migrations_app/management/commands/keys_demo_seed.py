from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser
from django.db import transaction

from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.lib.commands import OperatorCommand, http_url, non_negative_int, positive_int
from fleetops.notifications.models import ChannelKind, NotificationChannel
from fleetops.notifications.services import notification_channel_save
from migrations_app.keys.services import FAILED_EVENT, address_group_save, key_config_update
from migrations_app.models.keys import AddressGroup, Key, KeyState

GROUPS = {
    "us-east-anvil": {"services": ["anvil", "eth"], "relay_miner": "rm-us-east-1", "region": "us-east"},
    "eu-west-anvil": {
        "services": ["anvil", "eth", "base"],
        "relay_miner": "rm-eu-west-1",
        "region": "eu-west",
    },
    "ap-south-eth": {"services": ["eth"], "relay_miner": "rm-ap-south-1", "region": "ap-south"},
}


def demo_address(org_slug: str, index: int) -> str:
    return "pokt1" + hashlib.sha256(f"{org_slug}|key|{index}".encode()).hexdigest()[:38]


class Command(OperatorCommand):
    help = (
        "Seed address groups and staked keys for the demo organization, point its re-stakes at the "
        "chain simulator and subscribe an email channel to failed re-stakes (idempotent)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", default="demo")
        parser.add_argument("--rpc-url", type=http_url, required=True)
        parser.add_argument("--keys", type=non_negative_int, default=60)
        parser.add_argument("--max-attempts", type=positive_int, default=3)
        parser.add_argument("--email", default="provider-ops@example.com")

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError("keys_demo_seed is for the demo (DEBUG on).")
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(f"no organization {options['org']!r}; run demo_seed first")
        # The system actor (shell access: an admin by `fleetops.access.roles`), never a passed role.
        actor = Actor.system("keys_demo_seed")
        with transaction.atomic():
            key_config_update(
                org=org,
                actor=actor,
                values={"rpc_url": options["rpc_url"], "max_attempts": options["max_attempts"]},
            )
            groups = {}
            for name, values in GROUPS.items():
                existing = AddressGroup.objects.filter(org=org, name=name).first()
                groups[name] = existing or address_group_save(
                    org=org, actor=actor, group=None, values={"name": name, **values}
                )
            names = list(GROUPS)
            keys = []
            for i in range(options["keys"]):
                address = demo_address(org.slug, i)
                keys.append(
                    Key(
                        org=org,
                        address=address,
                        public_key="02" + hashlib.sha256(address.encode()).hexdigest(),
                        owner_address=demo_address(org.slug, 10_000 + i % 4),
                        address_group=groups[names[0] if i % 3 else names[1]],
                        state=KeyState.STAKED if i % 10 else KeyState.ATTENTION_NEEDED,
                    )
                )
            Key.objects.bulk_create(keys, ignore_conflicts=True)
            if not NotificationChannel.objects.filter(org=org, name="Provider ops email").exists():
                notification_channel_save(
                    org=org,
                    actor=actor,
                    channel=None,
                    values={
                        "name": "Provider ops email",
                        "kind": ChannelKind.EMAIL,
                        "target": options["email"],
                    },
                    event_types=[FAILED_EVENT],
                )
        total = Key.objects.filter(org=org).count()
        self.stdout.write(
            f"{org.slug}: {len(GROUPS)} address groups, {total} keys, re-stakes on {options['rpc_url']} "
            f"(max {options['max_attempts']} attempts); failures notify {options['email']}"
        )
