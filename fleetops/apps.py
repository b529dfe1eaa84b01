from __future__ import annotations

from django.contrib.admin.apps import AdminConfig


class FleetOpsAdminConfig(AdminConfig):
    default_site = "fleetops.admin_site.FleetOpsAdminSite"
