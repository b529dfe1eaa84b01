"""What the browser tests find in the console: one organization with a viewer, an operator and an
admin, a fleet of ten devices with telemetry, a pending curtailment event (started through the
service, so the audit log has a row to read), nine keys in two address groups at every migration
status, an indexed chain of 30 blocks with a source and six hours of lag samples, and a classified
protocol whose history migration has not started."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fleetops.access.models import Organization, Role
from fleetops.audit.actors import Actor


@dataclass
class Seed:
    org: Organization
    usernames: dict[str, str]
    users: dict[str, Any]
    event: Any
    keys: list[Any]
    groups: tuple[Any, Any]
    chain: Any
    protocol: Any
    migrated_protocol: Any

    def actor(self, role: str) -> Actor:
        return Actor.for_user(self.users[role])


def seed() -> Seed:
    from curtailment.models import CurtailmentEvent, DeviceSample
    from curtailment.planning import StartRequest
    from curtailment.services import curtailment_config_update, curtailment_start
    from fleetops.access.services import api_token_create
    from fleetops.lib import clock
    from fleetops.observability.leases import lease_acquire
    from indexer.ingest import lease_name
    from indexer.models import ChainLagSample, ConnectionStatus, IndexerState, SyncSource
    from migrations_app.models import Cursor, MigrationStatus, Protocol, ProtocolWriteSpan
    from migrations_app.models.keys import Key
    from tests.curtailment.conftest import make_fleet
    from tests.factories import MembershipFactory, UserFactory, make_indexed_chain
    from tests.migrations_app.keys_fixtures import make_group, make_keys

    org = Organization.objects.create(name="Acme Mining", slug="acme")
    usernames: dict[str, str] = {
        Role.VIEWER: "vera-viewer",
        Role.OPERATOR: "otto-operator",
        Role.ADMIN: "ada-admin",
    }
    users: dict[str, Any] = {}
    for role, username in usernames.items():
        users[role] = UserFactory(username=username)
        MembershipFactory(user=users[role], org=org, role=role)

    make_fleet(org, 10)
    # A few audited changes before the event, so the audit log has more than one row to read.
    admin = Actor.for_user(users[Role.ADMIN])
    curtailment_config_update(
        org=org, actor=admin, values={"max_duration_default_sec": 7200, "post_event_cooldown_sec": 600}
    )
    api_token_create(
        user=users[Role.OPERATOR], org=org, token_role=Role.OPERATOR, name="dispatch automation", actor=admin
    )
    event = curtailment_start(
        org=org,
        actor=Actor.for_user(users[Role.OPERATOR]),
        req=StartRequest(target_kw=6.0, reason="grid request"),
    ).event

    source, target = make_group(org, "us-east"), make_group(org, "eu-west")
    keys = make_keys(org, 9, group=source)
    Key.objects.filter(pk=keys[6].pk).update(
        migration_status="retrying",
        migration_attempts=1,
        migration_max_attempts=3,
        migration_next_attempt_at=clock.now() + timedelta(minutes=2),
        migration_last_error="broadcast timed out",
    )
    Key.objects.filter(pk=keys[7].pk).update(
        migration_status="succeeded", migration_attempts=1, migration_max_attempts=3
    )
    Key.objects.filter(pk=keys[8].pk).update(
        migration_status="scheduled", migration_max_attempts=3, migration_scheduled_at=clock.now()
    )
    Key.objects.filter(pk=keys[0].pk).update(
        migration_status="failed",
        migration_attempts=3,
        migration_max_attempts=3,
        migration_last_error="broadcast rejected: insufficient fee",
    )
    Key.objects.filter(pk=keys[1].pk).update(
        migration_status="failed",
        migration_attempts=3,
        migration_max_attempts=3,
        migration_last_error="broadcast rejected: insufficient fee",
    )

    # The event started eight minutes ago; its devices' telemetry covers the half hour before and
    # shows them curtailed for the last six minutes (the event page's power chart).
    now = clock.now()
    CurtailmentEvent.objects.filter(pk=event.pk).update(created_at=now - timedelta(minutes=8))
    event.refresh_from_db()
    samples = []
    for curtailed in event.targets.all():
        for minute in range(30, -1, -1):
            power = 300.0 if minute < 6 else 3000.0 + 40 * (minute % 5)
            samples.append(
                DeviceSample(
                    device_id=curtailed.device_id,
                    taken_at=now - timedelta(minutes=minute),
                    power_w=power,
                    hash_rate_hs=1e14 * power / 3000,
                )
            )
    DeviceSample.objects.bulk_create(samples)

    chain = make_indexed_chain(org, blocks=30)
    IndexerState.objects.filter(chain=chain).update(head_height=32, mode="normal")
    lease_acquire(name=lease_name(chain), holder="indexer-a:4242", ttl=timedelta(hours=2))
    SyncSource.objects.create(
        chain=chain,
        name="primary",
        rpc_url="http://127.0.0.1:26657",
        connection_status=ConnectionStatus.CONNECTED,
        last_success_at=now,
        head_height=32,
        latency_ms=42.0,
    )
    # Six hours of lag samples (the chain page's lag chart): a block or two behind, with a spike.
    ChainLagSample.objects.bulk_create(
        ChainLagSample(
            chain=chain,
            at=now - timedelta(minutes=m),
            head_height=32,
            indexed_height=32 - (9 if 120 <= m < 140 else m // 5 % 3),
        )
        for m in range(0, 360, 5)
    )
    protocol = Protocol.objects.create(
        protocol_id="SEP41",
        chain=chain,
        name="SEP-41 tokens",
        classification_status=MigrationStatus.SUCCESS,
        classified_at=clock.now(),
    )
    # A protocol whose history migration ran and handed off to live ingestion (the guide's picture).
    migrated = Protocol.objects.create(
        protocol_id="SEP50",
        chain=chain,
        name="SEP-50 NFTs",
        classification_status=MigrationStatus.SUCCESS,
        classified_at=now - timedelta(hours=2),
        history_migration_status=MigrationStatus.SUCCESS,
        history_started_at=now - timedelta(hours=1),
        history_handed_off_at=now - timedelta(minutes=20),
        history_handoff_height=21,
    )
    Cursor.objects.create(name=migrated.history_cursor_name, height=30, updated_at=now)
    for writer, low, high in (("history", 1, 20), ("live", 21, 30)):
        ProtocolWriteSpan.objects.create(
            protocol=migrated, writer=writer, from_height=low, to_height=high, created_at=now, updated_at=now
        )
    return Seed(
        org=org,
        usernames=usernames,
        users=users,
        event=event,
        keys=keys,
        groups=(source, target),
        chain=chain,
        protocol=protocol,
        migrated_protocol=migrated,
    )
