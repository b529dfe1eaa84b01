"""The API fuzzer: schemathesis over every operation of the served OpenAPI document, as each role
(viewer, operator and admin of one organization, admin of another), against the Django app
in-process through WSGI.

Valid (positive) and invalid (negative) requests are generated from the document with a fixed seed
(`derandomize`) and a bounded number of examples per operation and mode. Detail routes get the ids
of real objects for most positive examples, so they reach the views and not only the 404 path.
Every response must pass schemathesis' checks: no server error, a status code, content type and
body the document declares for the operation, and invalid data refused. The admin of the other
organization sends the first organization's ids and must never see one of its objects.

schemathesis is a dev dependency (`pip install -e ".[dev]"`): without it this module fails to
import, it is never skipped.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from django.test import Client
from django.utils.crypto import get_random_string
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from curtailment.models import CurtailmentEvent
from fleetops.access.context import ORG_HEADER
from fleetops.access.models import ApiToken, Organization, Role
from fleetops.access.services import api_token_create
from fleetops.audit.actors import Actor
from indexer.models import Enrichment, EnrichmentStatus, Event
from migrations_app.models import Protocol, ProtocolBalance, ProtocolStateChange
from tests.curtailment.conftest import make_fleet
from tests.factories import MembershipFactory, UserFactory, make_indexed_chain
from tests.migrations_app.keys_fixtures import make_group, make_keys

# Minutes long: started first when the suite runs on several workers.
pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 5}
# Operations with no invalid request to generate, found by the first role that tried them in this
# process; see _fuzz_operation.
NOTHING_INVALID: set[str] = set()
ROLES = ("viewer", "operator", "admin", "other_admin")


@dataclass
class Caller:
    role: str
    org_slug: str
    headers: dict[str, str]
    cookies: dict[str, str] = field(default_factory=dict)
    token_id: int | None = None


@dataclass
class World:
    """The objects the fuzzer aims at: path parameter values by operation path."""

    org: Organization
    ids: dict[str, list[Any]]
    spare_token_id: int

    def path_values(self, path: str, names: list[str]) -> dict[str, Any] | None:
        values: dict[str, Any] = {}
        for name in names:
            if name == "slug":
                values[name] = self.ids["chain"][0]
            elif name == "uuid":
                values[name] = self.ids["event"][0]
            elif name == "chain":
                values[name] = self.ids["chain"][0]
            elif name == "protocol_id":
                values[name] = self.ids["protocol"][0]
            elif name == "id" and path.startswith("/api/v1/keys/"):
                values[name] = self.ids["key"][0]
            elif name == "id" and path.startswith("/api/v1/tokens/"):
                values[name] = self.spare_token_id
            elif name == "id" and path.startswith("/api/v1/audit/"):
                values[name] = self.ids["audit"][0]
            else:
                return None
        return values


def _user(org: Organization, role: str, username: str) -> Any:
    user = UserFactory(username=username)
    MembershipFactory(user=user, org=org, role=role)
    return user


def _token(user: Any, org: Organization, role: str, name: str) -> Any:
    return api_token_create(user=user, org=org, token_role=role, name=name, actor=Actor.for_user(user))


def _populate(org: Organization, *, slug: str, operator: Any) -> dict[str, list[Any]]:
    """A chain with blocks, transactions, events and enrichments; protocol rows; devices and a live
    curtailment event with targets; keys in address groups; audit rows (from the above)."""
    chain = make_indexed_chain(org, slug=slug, blocks=3)
    events = Event.objects.filter(chain=chain).order_by("id")[:2]
    Enrichment.objects.bulk_create(
        Enrichment(
            chain=chain,
            height=e.height,
            phase=e.phase,
            tx_index=e.tx_index,
            event_index=e.event_index,
            payload="AQ==",
            status=status,
        )
        for e, status in zip(events, [EnrichmentStatus.FAILED, EnrichmentStatus.PENDING], strict=False)
    )
    protocol = Protocol.objects.create(protocol_id="SEP41", chain=chain, name="SEP-41")
    ProtocolStateChange.objects.create(
        protocol=protocol,
        chain=chain,
        height=2,
        phase="tx",
        tx_index=0,
        event_index=0,
        kind="transfer",
        account="acct1",
        counterparty="bob",
        asset="tok1",
        amount=5,
    )
    ProtocolBalance.objects.create(protocol=protocol, asset="tok1", account="bob", amount=5, height=2)
    group = make_group(org, name=f"{slug}-east")
    make_group(org, name=f"{slug}-west")
    keys = make_keys(org, 4, group=group)
    make_fleet(org, 6)
    client = Client()
    client.force_login(operator)
    started = client.post(
        "/api/v1/curtailment/events",
        {"target_kw": 6.0, "reason": "fuzz fixture"},
        content_type="application/json",
        HTTP_X_FLEETOPS_ORG=org.slug,
    )
    assert started.status_code == 201, started.content
    event = CurtailmentEvent.objects.get(uuid=started.json()["uuid"])
    from fleetops.audit.models import AuditEvent

    audit_ids = list(AuditEvent.objects.filter(org=org).values_list("id", flat=True)[:1])
    assert audit_ids
    return {
        "chain": [chain.slug],
        "event": [str(event.uuid)],
        "protocol": [protocol.protocol_id],
        "key": [keys[0].pk],
        "audit": audit_ids,
    }


def _session(user: Any, role: str, org: Organization) -> Caller:
    client = Client()
    client.force_login(user)
    secret = get_random_string(32)  # a CSRF secret; the header may carry it unmasked
    return Caller(
        role=role,
        org_slug=org.slug,
        headers={"X-CSRFToken": secret},
        cookies={"sessionid": client.cookies["sessionid"].value, "csrftoken": secret},
    )


@pytest.fixture
def world(db) -> tuple[World, dict[str, Caller]]:
    acme = Organization.objects.create(name="Acme", slug="acme")
    globex = Organization.objects.create(name="Globex", slug="globex")
    users = {
        "viewer": _user(acme, Role.VIEWER, "fuzz-viewer"),
        "operator": _user(acme, Role.OPERATOR, "fuzz-operator"),
        "admin": _user(acme, Role.ADMIN, "fuzz-admin"),
        "other_admin": _user(globex, Role.ADMIN, "fuzz-globex"),
    }
    ids = _populate(acme, slug="acme-chain", operator=users["operator"])
    _populate(globex, slug="globex-chain", operator=users["other_admin"])
    callers: dict[str, Caller] = {}
    for role in ("viewer", "operator", "other_admin"):
        org = globex if role == "other_admin" else acme
        issued = _token(users[role], org, _token_role(role), "fuzz")
        callers[role] = Caller(
            role=role,
            org_slug=org.slug,
            headers={"Authorization": f"Bearer {issued.plaintext}"},
            token_id=issued.token.pk,
        )
    # The admin works through a browser session (with its CSRF token): the interactive-only
    # operations (issuing tokens, terminating events) are reached too.
    callers["admin"] = _session(users["admin"], "admin", acme)
    spare = _token(users["viewer"], acme, Role.VIEWER, "revocable")
    return World(org=acme, ids=ids, spare_token_id=spare.token.pk), callers


def _token_role(role: str) -> str:
    return {"viewer": Role.VIEWER, "operator": Role.OPERATOR}.get(role, Role.ADMIN)


@pytest.fixture
def wsgi_app():
    """The project's WSGI application, sharing the test's database connection and transaction (as
    Django's test client does, the per-request connection cleanup is off)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@dataclass
class Tally:
    role: str
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nothing_invalid: int = 0  # operations an earlier role found no invalid request for

    def summary(self, operations: int) -> str:
        return (
            f"fuzz {self.role}: {operations} operations, {sum(self.cases.values())} requests "
            f"({', '.join(f'{n} {mode}' for mode, n in sorted(self.cases.items()))}) in {self.seconds:.1f}s; "
            f"statuses {dict(sorted(self.statuses.items()))}; "
            f"{self.nothing_invalid} operations with no invalid request (found by an earlier role)"
        )


class Strategies:
    """The strategies of every operation, built once and shared by the roles (building one is most
    of the cost of a few examples). With `derandomize` every role sends the same requests."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.built: dict[tuple[str, GenerationMode, str], Any] = {}

    def get(self, operation: Any, mode: GenerationMode, org_slug: str) -> Any:
        key = (operation.label, mode, org_slug)
        if key not in self.built:
            self.built[key] = self._build(operation, mode, org_slug)
        return self.built[key]

    def _build(self, operation: Any, mode: GenerationMode, org_slug: str) -> Any:
        """(aimed, case): in positive mode most examples name the first organization's real
        objects (and the caller's own organization, where they name one); the rest keep what was
        generated. Negative examples are left as generated."""
        free = operation.as_strategy(generation_mode=mode).map(lambda case: (False, case))
        if mode is not GenerationMode.POSITIVE:
            return free
        path_names = [p.name for p in operation.path_parameters]
        real_path = self.world.path_values(operation.path, path_names) if path_names else None
        if path_names and real_path is None:
            return free
        header_names = {p.name for p in operation.headers}
        aimed = operation.as_strategy(
            generation_mode=mode,
            path_parameters=real_path or None,
            headers={ORG_HEADER: org_slug} if ORG_HEADER in header_names else None,
        ).map(lambda case: (True, case))
        return st.one_of(aimed, aimed, free)


def _fuzz_operation(
    operation: Any, mode: GenerationMode, strategy: Any, caller: Caller, world: World, tally: Tally
) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=strategy)
    def run(drawn: tuple[bool, Any]) -> None:
        aimed, case = drawn
        if (
            operation.path.startswith("/api/v1/tokens/{id}")
            and case.path_parameters
            and case.path_parameters.get("id") == caller.token_id
        ):
            case.path_parameters["id"] = world.spare_token_id  # never revoke the fuzzer's own token
        # Each request in its own savepoint, as each runs in its own transaction in production: a
        # failed one cannot leave the next an aborted transaction.
        with transaction.atomic():
            response = case.call(headers=caller.headers, cookies=caller.cookies)
        tally.cases[mode.value] += 1
        tally.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=caller.headers)
        except (Exception, BaseExceptionGroup) as exc:  # collected, reported all at once at the end
            tally.failures.append(
                f"{caller.role} {mode.value} {operation.label}: {exc}\n  -> {case.as_curl_command()}"
            )
        # The other organization's admin aimed at the first organization's objects: never a 2xx
        # (a protocol id alone names the caller's own protocol of that id).
        named = set(case.path_parameters or {}) - {"protocol_id"}
        if caller.role == "other_admin" and aimed and named and 200 <= response.status_code < 300:
            tally.leaks.append(f"{operation.label} {case.path_parameters}: {response.status_code}")

    try:
        run()
    except Unsatisfiable:
        # Nothing invalid to send (every parameter accepts any string), or nothing valid. Hypothesis
        # draws hundreds of rejected examples before it says so. The negative strategy depends on
        # neither the role nor the world and `derandomize` fixes its draws, so every later role
        # would draw the same rejected examples and send nothing either: it is told at once.
        if mode is GenerationMode.NEGATIVE:
            NOTHING_INVALID.add(operation.label)


@pytest.mark.parametrize("role", ROLES)
def test_the_fuzzer_finds_no_server_error_and_no_schema_lie(role, world, wsgi_app, capsys):
    """One role per test, so the suite's workers share the four runs."""
    the_world, callers = world
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app)
    # Each role authenticates its own way (the fixture); generated credentials would be refused.
    schema.config.generation.update(with_security_parameters=False)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 37
    strategies = Strategies(the_world)
    caller = callers[role]
    tally = Tally(role=role)
    started = time.monotonic()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and operation.label in NOTHING_INVALID:
                tally.nothing_invalid += 1
                continue
            strategy = strategies.get(operation, mode, caller.org_slug)
            _fuzz_operation(operation, mode, strategy, caller, the_world, tally)
    tally.seconds = time.monotonic() - started
    with capsys.disabled():
        sys.stdout.write("\n" + tally.summary(len(operations)))

    assert not tally.failures, f"{len(tally.failures)} failures:\n" + "\n".join(tally.failures[:40])
    assert not tally.leaks, "another organization's objects answered:\n" + "\n".join(tally.leaks)
    # The role got past authentication to the views' own answers, successes included.
    assert tally.statuses[401] == 0, tally.summary(len(operations))
    assert sum(n for status, n in tally.statuses.items() if 200 <= status < 300) > 0
    # The fuzzer's own tokens were never revoked by its requests.
    assert not ApiToken.objects.filter(name="fuzz", revoked_at__isnull=False).exists()
