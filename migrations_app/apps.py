from __future__ import annotations

from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    """Key re-stake lifecycle (seed 000) and protocol history migration (seed 003).

    The explicit label keeps the app's tables and migration history apart from Django's own
    `migrations` machinery and reads well in the admin.
    """

    name = "migrations_app"
    label = "migrations_app"
    verbose_name = "Migrations"
