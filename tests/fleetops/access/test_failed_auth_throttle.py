"""Failed API-token attempts are limited per client address: past the limit every token from that
address is a 429 with Retry-After, before the token is looked at, and each outcome is counted."""

from __future__ import annotations

import copy

import pytest
from prometheus_client import REGISTRY
from rest_framework.test import APIClient

from fleetops.access.authentication import TOKEN_INVALID, TOKEN_REVOKED, TOKEN_THROTTLED
from fleetops.access.services import api_token_create, api_token_revoke
from fleetops.audit.actors import Actor
from fleetops.settings.env import env_cache
from tests.servers import free_port

pytestmark = pytest.mark.django_db
ME = "/api/v1/me/"
METRIC = "fleetops_access_failed_auth_total"


@pytest.fixture(autouse=True)
def _three_per_minute(settings):
    rest = copy.deepcopy(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"]["failed_auth"] = "3/min"
    settings.REST_FRAMEWORK = rest


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value(METRIC, {"outcome": outcome}) or 0.0


def _client(token: str, address: str = "203.0.113.7") -> APIClient:
    client = APIClient(REMOTE_ADDR=address)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def _issue(member, name="ci"):
    return api_token_create(
        user=member.user, org=member.org, token_role=member.role, name=name, actor=Actor.for_user(member.user)
    )


def test_the_fourth_bad_token_from_one_address_is_a_429_with_retry_after(viewer):
    invalid_before, throttled_before = _count("invalid"), _count("throttled")
    for n in range(3):
        response = _client(f"fo_guess{n}_secret").get(ME)
        assert response.status_code == 401
        assert response.json()["error"]["message"] == TOKEN_INVALID

    throttled = _client("fo_guess9_secret").get(ME)

    assert throttled.status_code == 429
    error = throttled.json()["error"]
    assert error["code"] == "throttled" and error["fields"] == {}
    assert error["message"].startswith(TOKEN_THROTTLED)
    assert 1 <= int(throttled["Retry-After"]) <= 61
    assert _count("invalid") - invalid_before == 3
    assert _count("throttled") - throttled_before == 1


def test_a_throttled_address_is_refused_even_with_a_valid_token(viewer):
    good = _issue(viewer).plaintext
    assert _client(good).get(ME).status_code == 200
    for n in range(3):
        assert _client(f"fo_guess{n}_secret").get(ME).status_code == 401

    # A correct guess during the wait is refused too, or the limit would not limit guessing.
    assert _client(good).get(ME).status_code == 429
    # Another address is not affected.
    assert _client(good, address="198.51.100.20").get(ME).status_code == 200


def test_revoked_tokens_count_as_failures(viewer):
    issued = _issue(viewer)
    api_token_revoke(token=issued.token, actor=Actor.for_user(viewer.user), reason="leaked")
    revoked_before = _count("revoked")
    for _ in range(3):
        response = _client(issued.plaintext).get(ME)
        assert response.status_code == 401
        assert response.json()["error"]["message"] == TOKEN_REVOKED

    assert _client(issued.plaintext).get(ME).status_code == 429
    assert _count("revoked") - revoked_before == 3


def test_successes_do_not_count_and_sessions_are_not_throttled(viewer):
    good = _issue(viewer).plaintext
    for _ in range(10):
        assert _client(good).get(ME).status_code == 200
    for n in range(3):
        assert _client(f"fo_guess{n}_secret").get(ME).status_code == 401
    session = viewer.session()
    assert session.get(ME, REMOTE_ADDR="203.0.113.7").status_code == 200


def test_the_address_is_the_socket_peer_unless_proxies_are_configured(viewer, settings):
    # No proxy in front: a forged X-Forwarded-For changes nothing.
    for n in range(3):
        forged = _client(f"fo_guess{n}_secret")
        assert forged.get(ME, HTTP_X_FORWARDED_FOR=f"10.0.0.{n}").status_code == 401
    assert _client("fo_guess_secret").get(ME, HTTP_X_FORWARDED_FOR="10.0.0.99").status_code == 429

    # Behind one proxy, the address it appended is the client's.
    rest = copy.deepcopy(settings.REST_FRAMEWORK)
    rest["NUM_PROXIES"] = 1
    settings.REST_FRAMEWORK = rest
    behind = _client("fo_guess_secret", address="10.1.1.1")
    assert behind.get(ME, HTTP_X_FORWARDED_FOR="192.0.2.50").status_code == 401
    assert behind.get(ME, HTTP_X_FORWARDED_FOR="192.0.2.51").status_code == 401


def test_the_limit_fails_open_while_a_redis_cache_is_down(viewer, settings):
    settings.CACHES = {"default": env_cache(environ={"CACHE_URL": f"redis://127.0.0.1:{free_port()}/13"})}
    good = _issue(viewer).plaintext
    for n in range(5):
        assert _client(f"fo_guess{n}_secret").get(ME).status_code == 401
    assert _client(good).get(ME).status_code == 200
