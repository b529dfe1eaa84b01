from __future__ import annotations

import logging

from fleetops.observability.context import actor_var, request_id_var


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `actor` to every record so both text and JSON formats can print them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get() or "-"
        if not getattr(record, "actor", None):
            record.actor = actor_var.get() or "-"
        return True
