from __future__ import annotations

from django.apps import AppConfig


class IndexerConfig(AppConfig):
    """The forever indexer and its sync sources (seeds 004 and 002)."""

    name = "indexer"
    verbose_name = "Indexer"
