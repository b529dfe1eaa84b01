"""The console's main pages load in Chromium with their assets and without script errors; with
FLEETOPS_DOC_SCREENSHOTS=DIR they are also pictured into DIR for the operator guide:

    FLEETOPS_DOC_SCREENSHOTS=docs/images ./scripts/test tests/browser/test_pages.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fleetops.access.models import Role
from tests.browser.conftest import ROOT

# One xdist worker runs them all (one browser, one seed); `slow` starts them early in the run.
pytestmark = [
    pytest.mark.xdist_group("browser"),
    pytest.mark.slow,
    pytest.mark.usefixtures("committed"),
]

DOC_SCREENSHOTS_VARIABLE = "FLEETOPS_DOC_SCREENSHOTS"


def _pages(seed: Any) -> list[tuple[str, str, str, str | None]]:
    """(file name, path, an element the page must show, the part pictured for the guide or None for
    the window as it opens)."""
    event = f"/admin/curtailment/curtailmentevent/{seed.event.pk}/change/"
    protocol = f"/admin/migrations_app/protocol/{seed.migrated_protocol.pk}/change/"
    return [
        ("console-dashboard", "/admin/", "#card-curtailment", None),
        ("console-event", event, "[data-live=curtailment-event]", "[data-live=curtailment-event]"),
        ("console-keys", "/admin/migrations_app/key/", "#result_list", None),
        ("console-protocol", protocol, "[data-live=protocol]", "[data-live=protocol]"),
        (
            "console-chain",
            f"/admin/indexer/chain/{seed.chain.pk}/change/",
            "[data-live=chain]",
            "[data-live=chain]",
        ),
        ("console-audit", "/admin/audit/auditevent/", "#result_list", None),
    ]


def test_the_main_pages_load_with_their_assets_and_no_script_errors(roles, shots, console):
    from playwright.sync_api import expect

    target = os.environ.get(DOC_SCREENSHOTS_VARIABLE, "").strip()
    directory = (ROOT / target) if target and not Path(target).is_absolute() else Path(target)
    page = roles.page(Role.ADMIN)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"script error: {error}"))
    page.on(
        "response",
        lambda response: (
            errors.append(f"{response.status} {response.url}") if response.status >= 400 else None
        ),
    )
    for name, path, shows, part in _pages(console.seed):
        response = page.goto(path)
        assert response is not None and response.status == 200, path
        expect(page.locator(shows).first).to_be_visible()
        page.wait_for_load_state("networkidle")
        shots.take(page, name)
        if target:
            directory.mkdir(parents=True, exist_ok=True)
            picture = directory / f"{name}.png"
            if part:
                page.locator(part).first.screenshot(path=str(picture))
            else:
                page.screenshot(path=str(picture))
        assert errors == [], f"{path}: {errors}"
