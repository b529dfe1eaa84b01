"""Task metrics and context through Celery's signals (worker side)."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import signals

from fleetops.observability.context import actor_var, request_id_var

_started: dict[str, tuple[float, Any, Any]] = {}


def _on_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    if task_id is None:
        return
    rid_token = request_id_var.set(task_id)
    actor_token = actor_var.set(f"task:{getattr(task, 'name', '?')}")
    _started[task_id] = (time.monotonic(), rid_token, actor_token)


def _on_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **kwargs: Any
) -> None:
    from fleetops.observability.metrics import CELERY_TASK_DURATION, CELERY_TASKS

    name = getattr(task, "name", "unknown")
    started = _started.pop(task_id or "", None)
    if started is not None:
        CELERY_TASK_DURATION.labels(task=name).observe(time.monotonic() - started[0])
        request_id_var.reset(started[1])
        actor_var.reset(started[2])
    CELERY_TASKS.labels(task=name, state=(state or "unknown").lower()).inc()


def _on_process_shutdown(pid: int | None = None, **kwargs: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def connect() -> None:
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="fleetops.metrics.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="fleetops.metrics.postrun")
    signals.worker_process_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="fleetops.metrics.exit"
    )
