"""Checks a running demo the way a new user would: every entry point answers, an admin can log in
and see the dashboard, beat -> broker -> worker -> database works (the worker heartbeat), and the
indexer process answers on its own port and indexes the simulated chain live."""

from __future__ import annotations

import http.cookiejar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from fleetops.devtools.services import VAR, say


def _opener() -> tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]:
    jar = http.cookiejar.CookieJar()
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)), jar


def _get(opener: urllib.request.OpenerDirector, url: str) -> tuple[int, str]:
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def _wait_ready(base: str, timeout: float) -> bool:
    opener, _ = _opener()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = _get(opener, f"{base}/health/ready")
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)  # polled, so the checks start as soon as the portal is ready
    return False


def _indexed_height(opener: urllib.request.OpenerDirector, url: str) -> tuple[int | None, str]:
    """(last indexed height, what the status said) from the chain status API."""
    request = urllib.request.Request(url, headers={"X-FleetOps-Org": "demo", "Accept": "application/json"})
    try:
        with opener.open(request, timeout=10) as response:
            status = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return None, str(exc)
    detail = (
        f"indexed {status.get('last_indexed_height')} head {status.get('head_height')} "
        f"mode {status.get('mode')}"
    )
    if status.get("last_error"):
        detail += f" ({status['last_error'][:200]})"
    return status.get("last_indexed_height"), detail


def _check_indexer(
    check: Callable[[str, bool, str], None], opener: urllib.request.OpenerDirector, base: str, indexer: str
) -> None:
    plain, _ = _opener()
    deadline = time.monotonic() + 60
    status = 0
    while time.monotonic() < deadline:
        try:
            status, _ = _get(plain, f"{indexer}/health/live")
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.2)
    check("indexer /health/live = 200 on its own port (≤ 60 s)", status == 200, str(status))
    try:
        status, body = _get(plain, f"{indexer}/metrics")
    except OSError as exc:
        status, body = 0, str(exc)
    check(
        "indexer /metrics = 200 with indexer metrics",
        status == 200 and "fleetops_indexer_" in body,
        str(status),
    )
    # Moves = a first indexed height, then a higher one: the simulator makes a block a second.
    url = f"{base}/api/v1/indexer/chains/sim/status"
    first: int | None = None
    moved, detail = False, ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not moved:
        height, detail = _indexed_height(opener, url)
        if height:
            if first is None:
                first = height
            moved = height > first
        if not moved:
            time.sleep(0.5)
    check("the chain's indexed height moves (≤ 90 s)", moved, detail)


def run_smoke(base: str, indexer: str | None = None) -> bool:
    failures: list[str] = []

    def check(label: str, ok: bool, detail: str = "") -> None:
        say(f"smoke: {'ok  ' if ok else 'FAIL'} {label}{' — ' + detail if detail and not ok else ''}")
        if not ok:
            failures.append(label)

    if not _wait_ready(base, 90):
        check("/health/ready answers 200 within 90 s", False)
        return False
    check("/health/ready = 200", True)
    opener, jar = _opener()
    status, body = _get(opener, f"{base}/health/live")
    check("/health/live = 200", status == 200, str(status))
    status, body = _get(opener, f"{base}/metrics")
    check("/metrics = 200 with fleetops metrics", status == 200 and "fleetops_" in body, str(status))
    status, body = _get(opener, f"{base}/api/docs/")
    check("/api/docs/ = 200", status == 200, str(status))
    assets = re.findall(r'src="([^"]+\.js)"', body)
    if assets:
        status, _ = _get(opener, urllib.parse.urljoin(base, assets[0]))
        check(
            "Swagger UI assets served locally", status == 200 and assets[0].startswith("/static/"), assets[0]
        )
    else:
        check("Swagger UI references its script", False, "no <script src> found")
    status, _ = _get(opener, f"{base}/api/schema/")
    check("/api/schema/ = 200", status == 200, str(status))
    status, body = _get(opener, f"{base}/admin/login/")
    check("login page = 200", status == 200 and "csrfmiddlewaretoken" in body, str(status))

    creds = json.loads((VAR / "demo_credentials.json").read_text())
    admin = creds["demo-admin"]
    token = next((c.value for c in jar if c.name == "csrftoken"), "")
    form = urllib.parse.urlencode(
        {"username": "demo-admin", "password": admin, "csrfmiddlewaretoken": token, "next": "/admin/"}
    ).encode()
    request = urllib.request.Request(
        f"{base}/admin/login/", data=form, headers={"Referer": f"{base}/admin/login/"}
    )
    try:
        with opener.open(request, timeout=10) as response:
            status, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, ""
    check(
        "demo-admin logs in and sees the ops dashboard",
        status == 200 and "Operations dashboard" in body,
        str(status),
    )
    script = re.search(r'src="([^"]*/fleetops/console[^"]*\.js)"', body)
    if script:
        status, _ = _get(opener, urllib.parse.urljoin(base, script.group(1)))
        check("the console's live script is served (static, no CDN)", status == 200, script.group(1))
    else:
        check("the dashboard references the console's live script", False, "no console.js <script>")
    status, card = _get(opener, f"{base}/admin/live/card/platform/")
    check(
        "a dashboard card's live fragment answers", status == 200 and "data-live-status" in card, str(status)
    )

    deadline = time.monotonic() + 120
    wanted = {"platform.worker", "curtailment.reconciler"}
    seen: set[str] = set()
    while time.monotonic() < deadline and seen != wanted:
        status, body = _get(opener, f"{base}/ops/status?format=json")
        if status == 200:
            for item in json.loads(body)["checks"]:
                if item["name"] == "heartbeats":
                    seen = wanted & {r.get("loop") for r in item["rows"]}
        if seen != wanted:
            time.sleep(0.5)
    check("worker heartbeat arrives through beat and the broker (≤ 120 s)", "platform.worker" in seen)
    check("the curtailment reconciler ticks (≤ 120 s)", "curtailment.reconciler" in seen)
    status, body = _get(opener, f"{base}/admin/curtailment/device/?q=m-00300")
    check("the demo fleet is synced from the simulator", status == 200 and "m-00300" in body, str(status))
    # The worker is another process: its task counter reaches the web's /metrics only through
    # prometheus_client's multi-process files.
    status, body = _get(opener, f"{base}/metrics")
    check(
        "worker task metrics are merged into the web's /metrics",
        'fleetops_celery_tasks_total{state="success",task="fleetops.observability.tasks.worker_heartbeat"}'
        in body,
    )
    if indexer:
        _check_indexer(check, opener, base, indexer)
    return not failures
