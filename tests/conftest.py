from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pytest_django.fixtures import validate_django_db
from rest_framework.test import APIClient

from fleetops.access.models import Organization, Role
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from tests import template_db
from tests.factories import MembershipFactory, UserFactory

# --- the test databases: one migration per run, copied for each xdist worker (tests/template_db.py) ---

_TEMPLATE = pytest.StashKey[template_db.Builder]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if template_db.wanted(session.config):
        session.config.stash[_TEMPLATE] = template_db.Builder()


def pytest_sessionfinish(session: pytest.Session) -> None:
    builder = session.config.stash.get(_TEMPLATE, None)
    if builder is not None:
        builder.finish()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    template_db.use_template()


@dataclass
class Member:
    user: Any
    org: Organization
    role: str

    def session(self) -> APIClient:
        client = APIClient()
        client.force_login(self.user)
        return client

    def token_client(self, role: str | None = None) -> APIClient:
        issued = api_token_create(
            user=self.user,
            org=self.org,
            token_role=role or self.role,
            name="test",
            actor=Actor.for_user(self.user),
        )
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.plaintext}")
        return client


@pytest.fixture
def org(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


@pytest.fixture
def other_org(db) -> Organization:
    return Organization.objects.create(name="Globex", slug="globex")


def _member(org: Organization, role: str, username: str) -> Member:
    user = UserFactory(username=username)
    MembershipFactory(user=user, org=org, role=role)
    return Member(user=user, org=org, role=role)


@pytest.fixture
def viewer(org) -> Member:
    return _member(org, Role.VIEWER, "vera-viewer")


@pytest.fixture
def operator(org) -> Member:
    return _member(org, Role.OPERATOR, "otto-operator")


@pytest.fixture
def admin_member(org) -> Member:
    return _member(org, Role.ADMIN, "ada-admin")


@pytest.fixture
def outsider(other_org) -> Member:
    return _member(other_org, Role.ADMIN, "gus-globex")


@pytest.fixture
def superuser(db) -> Any:
    return UserFactory(username="root", is_superuser=True)


@pytest.fixture
def members(viewer, operator, admin_member) -> dict[str, Member]:
    return {Role.VIEWER: viewer, Role.OPERATOR: operator, Role.ADMIN: admin_member}


# --- committed tests leave no partitions behind -------------------------------------------------------


@pytest.fixture(autouse=True)
def _drop_chain_partitions(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a committed test, drop the per-chain partitions its ingest created (a rolled-back test's
    DDL is rolled back with it). The flush that follows truncates every partition of the forever
    tables: a hundred chains' worth of them left behind would make each later flush seconds long."""
    yield
    if _database_use(request.node) != 2:
        return
    from django.db import connection

    from indexer import partitions

    partitions.partitions_forget()
    blocker = request.getfixturevalue("django_db_blocker")
    with blocker.unblock(), connection.cursor() as cur:
        parents = [m._meta.db_table for m in partitions.PARTITIONED]
        cur.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s) AND c.relname NOT LIKE %s",
            [parents, "%\\_default"],
        )
        names = [row[0] for row in cur.fetchall()]
        if names:
            cur.execute("DROP TABLE " + ", ".join(connection.ops.quote_name(n) for n in names))


# --- the order tests run in ------------------------------------------------------------------------


def _database_use(item: pytest.Item) -> int:
    """0: no database, 1: rolled back after each test, 2: committed (and flushed after each test)."""
    marker = item.get_closest_marker("django_db")
    fixtures = getattr(item, "fixturenames", ())
    transactional = "transactional_db" in fixtures or "live_server" in fixtures
    if marker is not None:
        transaction, reset_sequences, *_ = validate_django_db(marker)
        transactional = transactional or transaction or reset_sequences
    if transactional:
        return 2
    return 1 if marker is not None or "db" in fixtures else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first, so that the suite's wall time on several xdist workers is not one long
    test started last. pytest-django has already put the rolled-back tests before the committed ones
    (a committed test flushes the database, which a rolled-back test after it must not see); that
    order stays, and each part runs its `slow` tests first. Tests that use no database touch no
    state a database test sees, so the slow ones among them start the run and the rest end it."""

    def rank(item: pytest.Item) -> tuple[int, bool]:
        use, slow = _database_use(item), item.get_closest_marker("slow") is not None
        if use == 0:
            return (0 if slow else 3), False
        return use, not slow

    items.sort(key=rank)  # stable: file order within each part


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker with --dist loadgroup, every `xdist_group` test must carry its group in
    its node id (pytest-xdist adds it while collecting): otherwise the group is silently spread over
    every worker, as pytest-xdist 3.8 does under pytest 9.2 (see pyproject.toml)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid
    ]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(ungrouped)} xdist_group test(s), e.g. {ungrouped[0]}: "
            "this pytest and pytest-xdist do not work together"
        )
