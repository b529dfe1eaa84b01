"""What the operator commands (`indexer_reindex`, `indexer_verify`, `indexer_rollback`) share."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

from django.core.management.base import CommandError

from fleetops.audit.actors import Actor
from fleetops.observability.leases import LeaseGrant, lease_acquire
from fleetops.observability.models import Lease
from indexer.blocks import lease_name
from indexer.models import Chain, IndexerState

COMMAND_LEASE_TTL = timedelta(minutes=5)
LEASE_HELD = (
    "the writer lease of {chain} is held by {holder} until {expires:%H:%M:%S}: pause the chain "
    "(admin: Chains → Pause, or POST /api/v1/indexer/chains/{chain}/pause), wait for the writer to "
    "let go, then run this again"
)


def chain_or_error(slug: str) -> Chain:
    chain = Chain.objects.filter(slug=slug).first()
    if chain is None:
        known = ", ".join(Chain.objects.values_list("slug", flat=True)) or "none"
        raise CommandError(f"no chain {slug!r} (known: {known})")
    IndexerState.objects.get_or_create(chain=chain)
    return chain


def command_actor(command: str) -> Actor:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Actor.system(f"command:{command} ({user}@{socket.gethostname()})")


def take_writer_lease(chain: Chain, command: str) -> LeaseGrant:
    """The command writes like the indexer does, so it needs the same lease (fencing included)."""
    grant = lease_acquire(
        name=lease_name(chain),
        holder=f"{command}@{socket.gethostname()}:{os.getpid()}",
        ttl=COMMAND_LEASE_TTL,
    )
    if grant is None:
        lease = Lease.objects.get(name=lease_name(chain))
        raise CommandError(LEASE_HELD.format(chain=chain.slug, holder=lease.holder, expires=lease.expires_at))
    return grant


def batches(first: int, last: int, size: int) -> Iterator[range]:
    for start in range(first, last + 1, size):
        yield range(start, min(start + size - 1, last) + 1)


def indexed_range(chain: Chain, first: int | None, last: int | None) -> tuple[int, int]:
    state = IndexerState.objects.get(chain=chain)
    if state.last_indexed_height is None or state.oldest_indexed_height is None:
        raise CommandError(f"chain {chain.slug} has nothing indexed yet")
    lo = state.oldest_indexed_height if first is None else first
    hi = state.last_indexed_height if last is None else last
    if lo > hi:
        raise CommandError(f"--from {lo} is above --to {hi}")
    if lo < state.oldest_indexed_height or hi > state.last_indexed_height:
        raise CommandError(
            f"{lo}-{hi} is outside the indexed range "
            f"{state.oldest_indexed_height}-{state.last_indexed_height}"
        )
    return lo, hi
