"""The demo's chain: `sim`, indexed from the chain simulator the demo starts (idempotent).

The demo simulator starts at height 1 on every run while the demo database keeps what the last run
indexed. When the stored chain is ahead of the simulator (or the block at a common height differs,
e.g. another seed) the demo chain's rows are rolled back to nothing — under the writer lease, like
any rollback, and audited — so the indexer starts over with the new simulator instead of waiting
for it to reach the old height.
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser
from django.db import transaction

from fleetops.access.models import Organization
from fleetops.audit.actors import Actor
from fleetops.audit.services import changes_between, record, snapshot
from fleetops.lib.commands import (
    OperatorCommand,
    http_url,
    http_url_or_blank,
    positive_float,
    positive_int,
    websocket_url_or_blank,
)
from fleetops.lib.transition import transition
from fleetops.observability.leases import LeaseGrant, lease_acquire, lease_assert_held, lease_release
from indexer.blocks import lease_name
from indexer.ingest import blocks_rollback
from indexer.metrics import MODE_CHANGES
from indexer.models import (
    MODE_MACHINE,
    Block,
    Chain,
    IndexerState,
    SyncSource,
    beside_state,
    mode_edge_audited,
)
from indexer.partitions import partition_heights, partitions_ensure
from indexer.rpc.client import CometRpc, RpcError, SourceConfig

ACTOR = Actor.system("indexer_demo_seed")
NOT_DEBUG_MESSAGE = "indexer_demo_seed is for the demo (DEBUG on)."
NO_ORG_MESSAGE = "no organization {slug!r}; run demo_seed first"
UNREACHABLE_MESSAGE = "the chain simulator at {url} does not answer /status: {error}"
LEASE_BUSY_MESSAGE = (
    "another process holds the writer lease of {slug} (is an indexer_run still running?); "
    "stop it or wait for the lease to expire"
)
CHAIN_FIELDS = ("org", "chain_id", "expected_block_time_seconds", "catchup_batch_size")
SOURCE_FIELDS = ("rpc_url", "websocket_url", "priority", "enabled")
LEASE_WAIT_SECONDS = 40.0  # a killed indexer_run's lease expires after its 30 s TTL


class Command(OperatorCommand):
    help = (
        "Create the demo chain (chain id from the simulator's /status) and its sync sources for the "
        "demo organization. Idempotent."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--org", default="demo")
        parser.add_argument("--chain", default="sim", help="chain slug")
        parser.add_argument(
            "--rpc-url", type=http_url, required=True, help="the simulator's HTTP RPC, http://host:port"
        )
        parser.add_argument(
            "--ws-url",
            type=websocket_url_or_blank,
            default="",
            help="its WebSocket, ws://host:port/websocket",
        )
        parser.add_argument(
            "--backup-rpc-url",
            type=http_url_or_blank,
            default="",
            help="a second, lower-priority source (optional)",
        )
        parser.add_argument(
            "--block-time",
            type=positive_float,
            default=1.0,
            help="the simulator's --block-interval (seconds)",
        )
        parser.add_argument(
            "--batch-size", type=positive_int, default=50, help="catch-up blocks per transaction"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            raise CommandError(NOT_DEBUG_MESSAGE)
        org = Organization.objects.filter(slug=options["org"]).first()
        if org is None:
            raise CommandError(NO_ORG_MESSAGE.format(slug=options["org"]))
        rpc_url = options["rpc_url"].rstrip("/")
        # Named like the source row it becomes, so its requests count towards that source's metrics.
        with CometRpc([SourceConfig("primary", rpc_url)], timeout=5.0, attempts=3) as rpc:
            try:
                status = rpc.status()
            except RpcError as exc:
                raise CommandError(UNREACHABLE_MESSAGE.format(url=rpc_url, error=exc)) from exc
            chain = self._chain(org=org, slug=options["chain"], chain_id=status.chain_id, options=options)
            sources = [("primary", rpc_url, options["ws_url"], 10)]
            if options["backup_rpc_url"]:
                sources.append(("backup", options["backup_rpc_url"].rstrip("/"), "", 20))
            for name, url, ws_url, priority in sources:
                self._source(chain=chain, name=name, rpc_url=url, ws_url=ws_url, priority=priority)
            state, _ = IndexerState.objects.get_or_create(chain=chain)
            # The first height ranges before the writer starts (it keeps them ahead from then on).
            partitions_ensure(chain=chain, up_to_height=partition_heights(), from_height=0)
            if self._restarted(chain=chain, state=state, rpc=rpc, head=status.latest_height):
                self._start_over(chain=chain, head=status.latest_height)
        self.stdout.write(
            f"{org.slug}: chain {chain.slug} ({chain.chain_id}, head {status.latest_height}) from {rpc_url}"
        )

    # --- rows ------------------------------------------------------------------------------------------

    def _chain(self, *, org: Organization, slug: str, chain_id: str, options: dict[str, Any]) -> Chain:
        wanted = {
            "org": org,
            "chain_id": chain_id,
            "expected_block_time_seconds": options["block_time"],
            "catchup_batch_size": options["batch_size"],
        }
        with transaction.atomic():
            chain = Chain.objects.select_for_update().filter(slug=slug).first()
            if chain is None:
                chain = Chain.objects.create(slug=slug, **wanted)
                record(
                    action="indexer.chain_created",
                    actor=ACTOR,
                    org=org,
                    target=chain,
                    reason="demo seed",
                    changes=changes_between({}, snapshot(chain, CHAIN_FIELDS)),
                )
                return chain
            before = snapshot(chain, CHAIN_FIELDS)
            changes = changes_between(before, wanted)
            if changes:
                # A new chain id means another chain: the stored fingerprint belongs to the old one.
                if chain.chain_id != chain_id:
                    chain.fingerprint = ""
                for name, value in wanted.items():
                    setattr(chain, name, value)
                chain.save()
                record(
                    action="indexer.chain_updated",
                    actor=ACTOR,
                    org=org,
                    target=chain,
                    reason="demo seed",
                    changes=changes,
                )
        return chain

    def _source(self, *, chain: Chain, name: str, rpc_url: str, ws_url: str, priority: int) -> None:
        wanted = {"rpc_url": rpc_url, "websocket_url": ws_url, "priority": priority, "enabled": True}
        with transaction.atomic():
            source = SyncSource.objects.select_for_update().filter(chain=chain, name=name).first()
            before = snapshot(source, SOURCE_FIELDS) if source else {}
            changes = changes_between(before, wanted)
            if not changes:
                return
            if source is None:
                source = SyncSource.objects.create(chain=chain, name=name, **wanted)
            else:
                # The configuration columns only (named: never the connection status, which moves
                # through the kernel, `indexer.source_status`).
                SyncSource.objects.filter(pk=source.pk).update(
                    rpc_url=rpc_url, websocket_url=ws_url, priority=priority, enabled=True
                )
            record(
                action="indexer.source_created" if not before else "indexer.source_updated",
                actor=ACTOR,
                org=chain.org,
                target=source,
                reason="demo seed",
                changes=changes,
            )

    # --- a new simulator -------------------------------------------------------------------------------

    def _restarted(self, *, chain: Chain, state: IndexerState, rpc: CometRpc, head: int) -> bool:
        last = state.last_indexed_height
        if not last:
            return False
        if last > head:
            return True
        stored = Block.objects.filter(chain=chain, height=last).values_list("hash", flat=True).first()
        return stored is not None and stored != rpc.block(last).hash

    def _start_over(self, *, chain: Chain, head: int) -> None:
        grant = self._lease(chain)
        try:
            removed = blocks_rollback(
                chain=chain,
                to_height=0,
                lease=grant,
                actor=ACTOR,
                reason=f"demo seed: the simulator restarted (head {head}); indexing starts over",
            )
            reset: dict[str, Any] = {
                "oldest_indexed_height": None,
                "head_height": None,
                "head_moved_at": None,
                "paused": False,
                "poison_height": None,
                "poison_attempts": 0,
                "last_error": "",
                "rollback_requested_to": None,
                "rollback_requested_reason": "",
                "rollback_requested_by": "",
            }
            why = "demo seed: the simulator restarted"
            metadata = {"blocks_removed": removed, "simulator_head": head}
            with transaction.atomic():
                lease_assert_held(name=grant.name, token=grant.token)
                # The old run's verdicts (halt, poison height, identity) were about the old chain:
                # the mode starts over too, through the kernel (the system actor takes any edge).
                state = IndexerState.objects.select_for_update().get(chain=chain)
                before = state.mode
                # Out of degraded / halted the mode change is the audit row (MODE_MACHINE's
                # policy); from a quiet mode it is not, and the reset gets a row of its own.
                audited = before != MODE_MACHINE.initial and mode_edge_audited(before, MODE_MACHINE.initial)
                if before != MODE_MACHINE.initial:
                    transition(
                        state,
                        machine=MODE_MACHINE,
                        to=MODE_MACHINE.initial,
                        actor=ACTOR,
                        org=chain.org,
                        action="indexer.state_reset" if audited else None,
                        reason=why,
                        updates=reset,
                        audit_fields=("paused", "poison_height"),
                        metadata=metadata,
                    )
                    counter = MODE_CHANGES.labels(
                        chain=chain.slug, from_mode=before, to_mode=MODE_MACHINE.initial
                    )
                    transaction.on_commit(counter.inc)
                else:
                    # Already in the initial mode: the columns beside it (`beside_state` refuses the
                    # mode itself), while the mode is still the one read.
                    IndexerState.objects.filter(chain=chain, mode=before).update(
                        **beside_state(MODE_MACHINE, reset)
                    )
                if not audited:
                    record(
                        action="indexer.state_reset",
                        actor=ACTOR,
                        org=chain.org,
                        target=state,
                        reason=why,
                        metadata={**metadata, "mode": before},
                    )
                Chain.objects.filter(pk=chain.pk).update(fingerprint="")
        finally:
            lease_release(grant=grant)
        self.stdout.write(f"{chain.slug}: the simulator restarted; removed {removed} indexed blocks")

    def _lease(self, chain: Chain) -> LeaseGrant:
        holder = f"indexer_demo_seed@{socket.gethostname()}:{id(self)}"
        deadline = time.monotonic() + LEASE_WAIT_SECONDS
        while True:
            grant = lease_acquire(name=lease_name(chain), holder=holder, ttl=timedelta(seconds=60))
            if grant is not None:
                return grant
            if time.monotonic() > deadline:
                raise CommandError(LEASE_BUSY_MESSAGE.format(slug=chain.slug))
            time.sleep(1)
