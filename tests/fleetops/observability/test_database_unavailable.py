"""The database failing outside a view (SessionMiddleware saving the session after the view ran)
still answers 503 + Retry-After, not Django's 500. The real outage, with a PostgreSQL stopped under
a running gunicorn, is tests/fleetops/test_outages.py; this covers the path that test cannot aim at."""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import OperationalError
from django.test import Client

from fleetops.observability.outages import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser(superuser, settings) -> Client:
    settings.SESSION_SAVE_EVERY_REQUEST = True
    # Like a real browser, get the response even when the server raised.
    client = Client(raise_request_exception=False)
    client.force_login(superuser)
    return client


def session_save_fails():
    return mock.patch(
        "django.contrib.sessions.backends.db.SessionStore.save",
        side_effect=OperationalError("server closed the connection unexpectedly"),
    )


def test_a_session_that_cannot_be_saved_gives_the_database_unavailable_page(browser):
    with session_save_fails():
        response = browser.get("/admin/")
    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert b"Database unavailable" in response.content


def test_an_api_request_whose_session_cannot_be_saved_answers_in_the_error_shape(browser):
    with session_save_fails():
        response = browser.get("/api/v1/me/")
    assert response.status_code == 503
    assert response["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.json()["error"]["code"] == DATABASE_UNAVAILABLE


def test_other_server_errors_stay_500(browser):
    with mock.patch(
        "django.contrib.sessions.backends.db.SessionStore.save", side_effect=RuntimeError("a bug of ours")
    ):
        response = browser.get("/admin/")
    assert response.status_code == 500
