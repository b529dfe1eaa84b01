"""Live console pages: the script is a static file the live pages reference, every dashboard card has
a fragment endpoint rendering the same partial as the index, behind the same login and scoping, with
pinned query counts; the sampled history behind the sparklines stays bounded."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import RequestFactory, override_settings

from fleetops.admin_live import FRAGMENT_HEADER
from fleetops.audit.actors import Actor
from fleetops.lib import clock
from fleetops.observability import history, registry
from fleetops.observability.history import RETENTION, history_sample, trend_series
from fleetops.observability.models import MetricSample
from tests.factories import record

pytestmark = pytest.mark.django_db
SCRIPT = Path(__file__).resolve().parents[3] / "fleetops" / "static" / "fleetops" / "console.js"


def _live_regions(html: str) -> dict[str, str]:
    return dict(re.findall(r'data-live="([^"]+)" data-live-url="([^"]+)"', html))


def test_the_script_is_a_static_file_collected_and_served_by_whitenoise(tmp_path):
    assert finders.find("fleetops/console.js") and finders.find("fleetops/console.css")
    storage = {
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
        "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
    }
    with override_settings(STATIC_ROOT=tmp_path, STORAGES=storage):
        call_command("collectstatic", "--noinput", verbosity=0)
        from django.templatetags.static import static
        from whitenoise.middleware import WhiteNoiseMiddleware

        url = static("fleetops/console.js")
        assert re.fullmatch(r"/static/fleetops/console\.[0-9a-f]{12}\.js", url)  # hashed, cacheable
        middleware = WhiteNoiseMiddleware(lambda request: None)
        response = middleware(RequestFactory().get(url))
    assert response.status_code == 200
    assert b"visibilitychange" in b"".join(response.streaming_content)


def test_the_script_pauses_in_a_background_tab_and_documents_its_hooks():
    source = SCRIPT.read_text()
    assert "visibilitychange" in source and 'document.visibilityState === "hidden"' in source
    assert "data-live-interval" in source and "X-FleetOps-Fragment" in source
    for hook in ("dashboard-card-", "curtailment-event", "keys-changelist", "protocol", "chain"):
        assert hook in source.split("*/")[0]  # named in the header comment
    assert "cdn" not in source.lower() and "import " not in source


def test_the_dashboard_uses_the_width_and_every_card_is_live(client, viewer):
    client.force_login(viewer.user)
    html = client.get("/admin/").content.decode()
    assert "fleetops/console.js" in html and "fleetops/console.css" in html
    assert 'id="content" class="colM"' in html  # no empty right-hand column
    regions = _live_regions(html)
    assert {f"dashboard-card-{c.key}" for c in registry.cards()} <= set(regions)
    assert regions["dashboard-card-platform"] == "/admin/live/card/platform/"
    assert "data-live-status" in html and "updated " in html
    css = finders.find("fleetops/console.css")
    assert "repeat(auto-fit, minmax(" in Path(str(css)).read_text()


def test_a_card_fragment_is_the_same_partial_as_the_index(client, viewer):
    record(org=viewer.org, action="curtailment.started", actor=Actor.for_user(viewer.user))
    client.force_login(viewer.user)
    response = client.get("/admin/live/card/platform/")
    assert response.status_code == 200
    assert response[FRAGMENT_HEADER] == "1" and "no-store" in response["Cache-Control"]
    body = response.content.decode()
    assert "Audit events (24 h)" in body and 'data-trend="platform-audit"' in body
    assert re.search(r'data-live-at="\d\d:\d\d:\d\d">updated \d\d:\d\d:\d\d<', body)
    index = client.get("/admin/").content.decode()
    assert 'data-trend="platform-audit"' in index and "Audit events (24 h)" in index


def test_card_fragments_need_a_console_login_and_an_unknown_card_is_404(client, viewer):
    anonymous = client.get("/admin/live/card/platform/")
    assert anonymous.status_code == 302 and FRAGMENT_HEADER not in anonymous  # never swapped in
    client.force_login(viewer.user)
    assert client.get("/admin/live/card/nope/").status_code == 404


@pytest.mark.parametrize("key", ["platform", "curtailment", "indexer", "keys", "protocols"])
def test_card_fragment_query_counts_are_pinned(client, viewer, key, django_assert_max_num_queries):
    client.force_login(viewer.user)
    client.get(f"/admin/live/card/{key}/")  # warm the session and content types
    with django_assert_max_num_queries(10):
        assert client.get(f"/admin/live/card/{key}/").status_code == 200


def test_the_dashboard_query_count_is_pinned(client, viewer, django_assert_max_num_queries):
    client.force_login(viewer.user)
    client.get("/admin/")
    with django_assert_max_num_queries(26):
        assert client.get("/admin/").status_code == 200


def test_history_is_sampled_at_most_every_few_minutes_and_pruned(org, other_org):
    calls = []

    def sampler():
        calls.append(1)
        return [("test.series", org.pk, 3.0), ("test.series", other_org.pk, 4.0)]

    registry.register_sampler("test", sampler)
    try:
        now = clock.now()
        MetricSample.objects.create(series="test.series", org_id=org.pk, at=now - RETENTION * 2, value=1)
        assert history_sample(now=now) == 2
        assert history_sample(now=now + timedelta(minutes=1)) == 0  # not due yet
        assert history_sample(now=now + history.SAMPLE_EVERY) == 2
    finally:
        registry._samplers.pop("test")
    assert len(calls) == 2
    assert not MetricSample.objects.filter(at__lt=now - RETENTION).exists()  # pruned
    later = now + history.SAMPLE_EVERY
    assert trend_series(series=["test.series"], org_ids=[org.pk], now=later) == {"test.series": [3.0, 3.0]}
    both = trend_series(series=["test.series", "test.absent"], org_ids=None, now=later)
    assert both == {"test.series": [7.0, 7.0], "test.absent": [0.0, 0.0]}


def test_a_failing_sampler_does_not_stop_the_others(org):
    def broken():
        raise RuntimeError("boom")

    registry.register_sampler("a-broken", broken)
    registry.register_sampler("b-fine", lambda: [("test.fine", org.pk, 1.0)])
    try:
        history_sample()
    finally:
        registry._samplers.pop("a-broken")
        registry._samplers.pop("b-fine")
    assert MetricSample.objects.filter(series="test.fine").count() == 1


def test_the_platform_tick_records_history_for_every_registered_series(org):
    from fleetops.observability.tasks import worker_heartbeat
    from tests.migrations_app.keys_fixtures import make_keys

    make_keys(org, 2, migration_status="retrying")
    worker_heartbeat()
    rows = {(s, o): v for s, o, v in MetricSample.objects.values_list("series", "org_id", "value")}
    assert rows[("keys.retrying", org.pk)] == 2.0
    assert rows[(history.TICK, None)] == 1.0  # marks the instant: series absent there read as 0
