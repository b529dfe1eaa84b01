from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from rest_framework.test import APIClient

from fleetops.access.models import Organization, Role
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from tests.factories import MembershipFactory, UserFactory


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
