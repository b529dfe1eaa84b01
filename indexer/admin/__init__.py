"""The indexer in the operator console, one module per kind of page:

- `chains`: chains with their state, sources, enrichment backlog and lag chart, and the operator
  actions (retry poison height, pause, resume, roll back, re-queue), each calling its service;
- `sources`: sync sources with their connection status and health;
- `rows`: blocks, transactions, events and enrichment rows, read-only lists over tables of millions
  of rows (plus the enrichment re-queue action);
- `common`: badges and the scoping of rows by the user's chains.

Each page that shows a state machine draws it from its declaration (`StateDiagramMixin`).
"""

from __future__ import annotations

from indexer.admin.chains import ChainAdmin
from indexer.admin.rows import BlockAdmin, EnrichmentAdmin, EventAdmin, TransactionAdmin
from indexer.admin.sources import SyncSourceAdmin

__all__ = ["BlockAdmin", "ChainAdmin", "EnrichmentAdmin", "EventAdmin", "SyncSourceAdmin", "TransactionAdmin"]
