"""Each role's flows through the console in Chromium, checked by what the page shows: an operator
starts (preview, then confirm), updates and stops an event, migrates keys and retries one; an admin
terminates an event, starts a history migration and rolls a chain back through its confirmation; a
viewer reads the audit trail, gets no action buttons and a styled refusal when forcing an action
URL; live regions change without a reload and stop fetching in a background tab."""

from __future__ import annotations

import re
from typing import Any

import pytest

from fleetops.access.models import Role

# One xdist worker runs them all (one browser, one seed); `slow` starts them early in the run.
pytestmark = [
    pytest.mark.xdist_group("browser"),
    pytest.mark.slow,
    pytest.mark.usefixtures("committed"),
]

EVENTS = "/admin/curtailment/curtailmentevent"
KEYS = "/admin/migrations_app/key"
PROTOCOLS = "/admin/migrations_app/protocol"
CHAINS = "/admin/indexer/chain"
AUDIT = "/admin/audit/auditevent"


def expect(target: Any) -> Any:
    # Imported when used: without playwright the module still collects, and the tests skip saying why.
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def readonly(page: Any, name: str) -> Any:
    """A read-only field's value on an admin change page."""
    return page.locator(f".field-{name} .readonly").first


def object_tool(page: Any, label: str) -> Any:
    return page.locator(".object-tools").get_by_role("link", name=label, exact=True)


def messages(page: Any) -> Any:
    return page.locator("ul.messagelist")


def test_an_operator_previews_starts_updates_and_stops_an_event(roles, shots, console):
    from curtailment.models import CurtailmentEvent
    from fleetops.audit.models import AuditEvent

    page = roles.page(Role.OPERATOR)
    page.goto(f"{EVENTS}/start/")
    page.locator("#id_org").select_option("acme")
    page.locator("#id_target_kw").fill("7")
    page.locator("#id_reason").fill("peak price")
    page.get_by_role("button", name="Preview").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Plan: \d+ devices"))).to_be_visible()
    shots.take(page, "preview")
    assert not CurtailmentEvent.objects.filter(reason="peak price").exists()  # a preview writes nothing

    page.get_by_role("button", name="Start curtailment").click()
    page.wait_for_url(re.compile(r"/change/$"))
    event = CurtailmentEvent.objects.get(reason="peak price")
    assert page.url.endswith(f"{EVENTS}/{event.pk}/change/")
    expect(readonly(page, "reason")).to_have_text("peak price")
    expect(readonly(page, "state")).to_have_text(re.compile("pending", re.I))
    expect(object_tool(page, "Terminate")).to_have_count(0)  # admins only
    shots.take(page, "started")

    object_tool(page, "Update").click()
    interval = page.locator("#id_restore_batch_interval_sec")
    expect(interval).to_have_value("30")  # the form starts from the event's current values
    interval.fill("45")
    page.locator("#id_reason").fill("slower restore for the transformer")
    shots.take(page, "update-form")
    page.get_by_role("button", name="Update").click()
    expect(messages(page)).to_contain_text("Event updated")
    expect(readonly(page, "restore_batch_interval_sec")).to_have_text("45")
    # The update's reason goes to the audit log; the event keeps its own title.
    expect(readonly(page, "reason")).to_have_text("peak price")
    shots.take(page, "updated")

    object_tool(page, "Stop").click()
    reason = page.locator("#id_reason")
    page.get_by_role("button", name="Stop").click()  # no reason: the browser refuses to send it
    assert reason.evaluate("field => field.validity.valueMissing") is True
    assert page.url.endswith(f"{EVENTS}/{event.pk}/action/stop/")
    reason.fill("price dropped")
    page.get_by_role("button", name="Stop").click()
    expect(messages(page)).to_contain_text("Restoring")
    expect(readonly(page, "state")).to_have_text(re.compile("restoring", re.I))
    shots.take(page, "stopped")
    assert AuditEvent.objects.get(action="curtailment.stopped", target_id=str(event.pk)).reason == (
        "price dropped"
    )


def test_an_admin_terminates_a_pending_event(roles, shots, console):
    from curtailment.models import CurtailmentEvent, ScopeType
    from curtailment.planning import StartRequest
    from curtailment.services import curtailment_start

    request = StartRequest(
        target_kw=3.0, reason="test feeder", scope_type=ScopeType.DEVICE_LIST, device_identifiers=("m-000",)
    )
    event = curtailment_start(
        org=console.seed.org, actor=console.seed.actor(Role.OPERATOR), req=request
    ).event
    page = roles.page(Role.ADMIN)
    page.goto(f"{EVENTS}/{event.pk}/change/")
    shots.take(page, "event")
    object_tool(page, "Terminate").click()
    page.locator("#id_target_state").select_option("cancelled")
    page.locator("#id_reason").fill("duplicate of the grid request")
    shots.take(page, "terminate-form")
    page.get_by_role("button", name="Terminate").click()
    expect(messages(page)).to_contain_text("terminated")
    expect(readonly(page, "state")).to_have_text(re.compile("cancelled", re.I))
    # Never-dispatched targets are not "restore failed" with the operator's reason as their error.
    expect(page.get_by_role("cell", name="duplicate of the grid request")).to_have_count(0)
    shots.take(page, "terminated")
    assert CurtailmentEvent.objects.get(pk=event.pk).state == "cancelled"


def test_an_operator_migrates_keys_and_retries_a_failed_key(roles, shots, console):
    from fleetops.audit.models import AuditEvent
    from migrations_app.models.keys import Key

    keys, (_, target) = console.seed.keys, console.seed.groups
    page = roles.page(Role.OPERATOR)
    page.goto(f"{KEYS}/")
    for key in keys[2:4]:
        page.locator(f"input.action-select[value='{key.pk}']").check()
    page.locator("select[name=action]").select_option("migrate_keys")
    shots.take(page, "selected")
    page.get_by_role("button", name="Go").click()
    expect(page.locator("p", has_text="will move").locator("strong")).to_have_text("2")
    expect(page.get_by_role("cell", name=keys[2].address)).to_be_visible()
    page.locator("#id_target_group").select_option(label=target.name)
    page.locator("#id_reason").fill("rebalance onto eu-west")
    shots.take(page, "migrate-preview")
    page.get_by_role("button", name="Migrate 2 keys").click()
    expect(messages(page)).to_contain_text(f"Migrated 2 key(s) to {target.name}")
    shots.take(page, "migrated")
    assert set(Key.objects.filter(address_group=target).values_list("pk", flat=True)) == {
        keys[2].pk,
        keys[3].pk,
    }

    page.goto(f"{KEYS}/{keys[0].pk}/change/")
    shots.take(page, "failed-key")
    object_tool(page, "Retry migration").click()
    page.locator("#id_reason").fill("fee raised")
    page.get_by_role("button", name="Retry migration").click()
    expect(messages(page)).to_contain_text("Retry scheduled")
    shots.take(page, "retried")
    assert Key.objects.get(pk=keys[0].pk).migration_manual_retries == 1
    assert AuditEvent.objects.filter(target_id=str(keys[0].pk), reason="fee raised").exists()


def test_an_admin_starts_the_history_migration_and_an_operator_is_not_offered_it(roles, shots, console):
    from fleetops.audit.models import AuditEvent

    protocol = console.seed.protocol
    url = f"{PROTOCOLS}/{protocol.pk}/change/"
    operator = roles.page(Role.OPERATOR)
    operator.goto(url)
    expect(operator.get_by_role("heading", name=re.compile("SEP41|SEP-41"))).not_to_have_count(0)
    expect(object_tool(operator, "Start history migration")).to_have_count(0)

    page = roles.page(Role.ADMIN)
    page.goto(url)
    shots.take(page, "protocol")
    object_tool(page, "Start history migration").click()
    expect(page.locator("#id_window_size")).to_have_value(re.compile(r"^\d+$"))
    page.locator("#id_reason").fill("backfill for the wallet")
    shots.take(page, "history-form")
    page.get_by_role("button", name="Start history migration").click()
    expect(messages(page)).to_contain_text("History migration queued")
    shots.take(page, "queued")
    assert AuditEvent.objects.get(action="protocol.history_requested").reason == "backfill for the wallet"


def test_an_admin_rolls_a_chain_back_only_after_confirming(roles, shots, console):
    from indexer.models import IndexerState

    chain = console.seed.chain
    page = roles.page(Role.ADMIN)
    page.goto(f"{CHAINS}/{chain.pk}/change/")
    shots.take(page, "chain")
    object_tool(page, "Roll back to height").click()
    page.locator("#id_to_height").fill("25")
    page.locator("#id_reason").fill("node b served a fork")
    page.get_by_role("button", name="Roll back to height").click()
    # Step two: what will be deleted, and nothing requested yet.
    expect(page.get_by_role("heading", name="Roll back sim to height 25?")).to_be_visible()
    expect(page.locator(".errornote")).to_contain_text("5 blocks")
    expect(page.locator(".errornote")).to_contain_text("heights 26 to 30")
    shots.take(page, "confirm")
    assert IndexerState.objects.get(chain=chain).rollback_requested_to is None
    page.get_by_role("button", name="Yes, roll back to height 25").click()
    page.wait_for_url(re.compile(rf"{CHAINS}/{chain.pk}/change/$"))
    expect(messages(page)).to_be_visible()
    shots.take(page, "requested")
    state = IndexerState.objects.get(chain=chain)
    assert (state.rollback_requested_to, state.rollback_requested_reason) == (25, "node b served a fork")


def test_a_viewer_reads_the_audit_trail_sees_no_actions_and_a_styled_refusal(roles, shots, console):
    from fleetops.audit.models import AuditEvent

    event = console.seed.event
    page = roles.page(Role.VIEWER)
    page.goto("/admin/")
    expect(page.locator("#card-curtailment")).to_be_visible()
    expect(page.get_by_role("link", name=re.compile("Start an event"))).to_have_count(0)
    shots.take(page, "dashboard")

    page.goto(f"{AUDIT}/")
    expect(page.locator("#result_list")).to_contain_text("curtailment.started")
    page.locator("#searchbar").fill("grid request")
    page.locator("#searchbar").press("Enter")
    expect(page.locator("#result_list")).to_contain_text("grid request")
    shots.take(page, "audit-search")

    page.goto(f"{EVENTS}/{event.pk}/change/")
    expect(readonly(page, "reason")).to_have_text("grid request")
    for label in ("Stop", "Update", "Terminate", "Force stop"):
        expect(object_tool(page, label)).to_have_count(0)
    object_tool(page, "Audit trail").click()  # the event's own trail
    expect(page.locator("#result_list")).to_contain_text("curtailment.started")
    assert f"target_id={event.pk}" in page.url
    shots.take(page, "event-audit-trail")
    page.goto(f"{KEYS}/")
    expect(page.locator("#result_list")).to_be_visible()
    expect(page.locator("select[name=action]")).to_have_count(0)
    shots.take(page, "keys-read-only")

    denied_before = AuditEvent.objects.filter(action="access.denied").count()
    response = page.goto(f"{EVENTS}/{event.pk}/action/stop/")
    assert response is not None and response.status == 403
    # The console's own page (its header and style), saying which role the action needs.
    expect(page.locator("#header")).to_be_visible()
    expect(page.locator("link[rel=stylesheet][href*='admin/css/base']")).to_have_count(1)
    expect(page.locator("#content")).to_contain_text(re.compile("operator", re.I))  # the role needed
    expect(page.locator("#content")).to_contain_text(re.compile("viewer", re.I))  # the role held
    shots.take(page, "refused")
    assert AuditEvent.objects.filter(action="access.denied").count() == denied_before + 1


def _mark_document(page: Any) -> None:
    """A marker on the window: gone if the page is reloaded or navigated."""
    page.evaluate("window.__fleetopsNoReload = true")


def _not_reloaded(page: Any) -> bool:
    return bool(page.evaluate("window.__fleetopsNoReload === true"))


def _set_visibility(page: Any, *, hidden: bool) -> None:
    """What the browser does when the tab goes to the background (or comes back)."""
    page.evaluate(
        """hidden => {
            const state = hidden ? "hidden" : "visible";
            Object.defineProperty(document, "visibilityState", {configurable: true, get: () => state});
            Object.defineProperty(document, "hidden", {configurable: true, get: () => hidden});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        hidden,
    )


def test_the_keys_changelist_changes_without_a_reload_and_pauses_in_a_background_tab(roles, shots, console):
    from migrations_app.keys.lifecycle import key_migration_retry
    from migrations_app.models.keys import Key

    key = console.seed.keys[1]
    page = roles.page(Role.VIEWER)
    page.clock.install()
    page.goto(f"{KEYS}/")
    region = page.locator("[data-live=keys-changelist]")
    row = region.locator("tr", has=page.get_by_role("link", name=key.address))
    expect(row).to_contain_text(re.compile("failed", re.I))
    _mark_document(page)
    shots.take(page, "before")

    key_migration_retry(
        key=Key.objects.get(pk=key.pk), actor=console.seed.actor(Role.OPERATOR), reason="fee raised"
    )
    interval = float(region.get_attribute("data-live-interval") or "10")
    page.clock.run_for(int((interval + 1) * 1000))
    expect(row).to_contain_text(re.compile("scheduled", re.I))
    expect(row).not_to_contain_text(re.compile("failed", re.I))
    assert _not_reloaded(page)
    shots.take(page, "after")

    # A background tab fetches nothing; coming back refreshes at once.
    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url) if "/live" in request.url else None)
    _set_visibility(page, hidden=True)
    page.clock.run_for(int(interval * 6 * 1000))
    # A fetch starts synchronously in the timer callback: none is in flight and none was sent.
    assert page.evaluate("window.FleetOpsLive.regions.every(region => !region.inFlight)") is True
    assert fetched == []
    with page.expect_request(re.compile(r"/live")):
        _set_visibility(page, hidden=False)
    assert _not_reloaded(page)


def _refresh_live_regions(page: Any) -> None:
    """Let the page's own refresh timers fire (the clock moves past the longest interval)."""
    longest = page.evaluate(
        "Math.max(...[...document.querySelectorAll('[data-live-url]')]"
        ".map(el => parseFloat(el.getAttribute('data-live-interval') || '10')))"
    )
    page.clock.run_for(int((float(longest) + 1) * 1000))


def test_the_dashboard_event_and_chain_pages_change_without_a_reload(roles, shots, console):
    from curtailment.models import ScopeType
    from curtailment.planning import StartRequest
    from curtailment.services import curtailment_start, curtailment_stop
    from indexer.services import indexer_pause

    operator = console.seed.actor(Role.OPERATOR)
    dashboard = roles.page(Role.ADMIN)
    dashboard.clock.install()
    dashboard.goto("/admin/")
    card = dashboard.locator("[data-live=dashboard-card-curtailment]")
    expect(card).to_be_visible()
    expect(card).not_to_contain_text("live feeder test")
    _mark_document(dashboard)

    request = StartRequest(
        target_kw=3.0,
        reason="live feeder test",
        scope_type=ScopeType.DEVICE_LIST,
        device_identifiers=("m-001",),
    )
    event = curtailment_start(org=console.seed.org, actor=operator, req=request).event
    _refresh_live_regions(dashboard)
    expect(card.get_by_role("link", name="live feeder test")).to_be_visible()
    assert _not_reloaded(dashboard)
    shots.take(dashboard, "dashboard-after-start")

    page = roles.page(Role.ADMIN)
    page.clock.install()
    page.goto(f"{EVENTS}/{event.pk}/change/")
    state = page.locator("[data-live=curtailment-event] [data-live-field=state]")
    expect(state).to_have_text("pending")
    _mark_document(page)
    curtailment_stop(event=event, actor=operator, reason="feeder back to normal")
    _refresh_live_regions(page)
    expect(state).to_have_text("restoring")
    assert _not_reloaded(page)
    shots.take(page, "event-after-stop")

    chain = console.seed.chain
    page.goto(f"{CHAINS}/{chain.pk}/change/")
    region = page.locator("[data-live=chain]")
    expect(region).not_to_contain_text(re.compile("paused", re.I))
    _mark_document(page)
    indexer_pause(chain=chain, actor=console.seed.actor(Role.ADMIN), reason="node upgrade")
    _refresh_live_regions(page)
    expect(region).to_contain_text(re.compile("paused", re.I))
    assert _not_reloaded(page)
    shots.take(page, "chain-after-pause")
