from __future__ import annotations

from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.db import transaction

from fleetops.access.models import Membership, Organization, Role
from fleetops.audit.services import record as audit_record


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Organization
        django_get_or_create = ("slug",)

    name = factory.Sequence(lambda n: f"Org {n}")
    slug = factory.Sequence(lambda n: f"org-{n}")


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    is_staff = True
    password = factory.PostGenerationMethodCall("set_password", "correct horse battery")

    @factory.post_generation
    def save_password(obj: Any, create: bool, extracted: Any, **kwargs: Any) -> None:
        if create:
            obj.save()


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    org = factory.SubFactory(OrganizationFactory)
    role = Role.VIEWER


def make_indexed_chain(org: Organization, *, slug: str = "sim", blocks: int = 0, **state: Any) -> Any:
    """A chain with its IndexerState and `blocks` blocks (2 txs, 4 events each) committed through
    the real fenced `blocks_commit`, as the writer does (the lease is released afterwards)."""
    from datetime import timedelta

    from fleetops.observability.leases import lease_acquire, lease_release
    from indexer.ingest import blocks_commit, lease_name
    from indexer.models import Chain, IndexerState
    from tests.indexer.test_ingest import make_chain_blocks

    chain = Chain.objects.create(org=org, slug=slug, chain_id=f"{slug}-1")
    IndexerState.objects.create(chain=chain)
    if blocks:
        grant = lease_acquire(name=lease_name(chain), holder="factory", ttl=timedelta(seconds=30))
        assert grant is not None
        batch = make_chain_blocks(1, blocks, salt=slug)
        for start in range(0, blocks, 500):
            blocks_commit(chain=chain, blocks=batch[start : start + 500], lease=grant)
        lease_release(grant=grant)
    if state:
        IndexerState.objects.filter(chain=chain).update(**state)
    chain.refresh_from_db()
    return chain


def record(**kwargs):
    """`fleetops.audit.services.record` inside its own transaction (it refuses to run outside one),
    for tests that seed audit rows directly."""
    with transaction.atomic():
        return audit_record(**kwargs)
