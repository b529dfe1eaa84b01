"""What the writer's modules share, so none of them imports another for it: a fetched block with
its results (`IndexedBlock`, written by `indexer.ingest`, read by enrichment, verification and the
producers), the name of a chain's writer lease (which fences every write of the indexed tables,
and which the selectors read to name the leader), and the actor the writer acts as."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetops.audit.actors import Actor
from indexer.rpc import parse

if TYPE_CHECKING:
    from indexer.models import Chain


# The ingest loop (`indexer_run`) is an engine: the scheduler actor (the operator role plus the
# machines' engine edges, see `fleetops.access.roles`).
WRITER = Actor.scheduler("indexer_run")


@dataclass(frozen=True)
class IndexedBlock:
    block: parse.Block
    results: parse.BlockResults

    @property
    def height(self) -> int:
        return self.block.height


def lease_name(chain: Chain) -> str:
    return f"indexer:{chain.slug}"
