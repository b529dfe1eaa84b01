"""The Celery app. Beat runs django-celery-beat's DatabaseScheduler; the schedules themselves are
declared in code (`fleetops.schedules`) and synced into its tables by `manage.py schedules_sync`."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleetops.settings.dev")

app = Celery("fleetops")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

from fleetops.observability import celery_signals  # noqa: E402

celery_signals.connect()
