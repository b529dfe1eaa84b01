from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from fleetops.access.selectors import org_ids_for_user
from fleetops.audit.models import AuditEvent


def audit_event_visible_to(*, user: Any) -> QuerySet[AuditEvent]:
    """Superusers see everything (including org-less events such as failed logins); members see
    their organizations' events."""
    qs = AuditEvent.objects.select_related("org")
    if getattr(user, "is_superuser", False):
        return qs
    return qs.filter(org_id__in=org_ids_for_user(user))
