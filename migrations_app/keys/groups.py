"""Admin writes of the key setup: the organization's re-stake config and its address groups.

Each is one transaction with its audit row inside; the admin role is derived from the actor and
checked before the transaction opens, so a refusal's `access.denied` row commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import transaction

from fleetops.access.models import Organization, Role
from fleetops.audit.actors import Actor
from fleetops.audit.services import record
from fleetops.lib.errors import Conflict, ValidationFailed
from migrations_app.keys.common import KeyAction, require
from migrations_app.models.keys import AddressGroup, Key, OrgKeyConfig

GROUP_HAS_KEYS = "address group {name} still has {n} key(s); migrate them first"
CONFIG_FIELDS = ("rpc_url", "max_attempts")
GROUP_FIELDS = (
    "name",
    "services",
    "relay_miner",
    "region",
    "operator_shares",
    "supplier_share_percentage",
    "private",
)


def key_config_update(*, org: Organization, actor: Actor, values: Mapping[str, Any]) -> OrgKeyConfig:
    """Admins point the organization's re-stakes at a chain and set its attempt limit."""
    require(actor=actor, org=org, role=Role.ADMIN, what="keys.config_update")
    if unknown := set(values) - set(CONFIG_FIELDS):
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    with transaction.atomic():
        config, _ = OrgKeyConfig.objects.select_for_update().get_or_create(org=org)
        changes = {k: [getattr(config, k), v] for k, v in values.items() if getattr(config, k) != v}
        if not changes:
            return config
        for key, value in values.items():
            setattr(config, key, value)
        try:
            config.full_clean()
        except Exception as exc:
            raise ValidationFailed(str(exc)) from exc
        config.save()
        record(action=KeyAction.CONFIG_UPDATED, actor=actor, org=org, target=config, changes=changes)
    return config


def address_group_save(
    *, org: Organization, actor: Actor, group: AddressGroup | None, values: Mapping[str, Any]
) -> AddressGroup:
    """Create or change an address group (admin). Existing keys are not re-staked by this; migrate
    them to re-stake."""
    require(actor=actor, org=org, role=Role.ADMIN, what="keys.address_group_save", target=group)
    if unknown := set(values) - set(GROUP_FIELDS):
        raise ValidationFailed(f"unknown fields {sorted(unknown)}")
    services = values.get("services")
    if services is not None and (
        not isinstance(services, list) or not all(isinstance(s, str) and s for s in services)
    ):
        raise ValidationFailed("services must be a list of service ids", fields={"services": ["invalid"]})
    with transaction.atomic():
        if group is None:
            group, before = AddressGroup(org=org), {}
        else:
            group = AddressGroup.objects.select_for_update().get(pk=group.pk, org=org)
            before = {k: getattr(group, k) for k in GROUP_FIELDS}
        for key, value in values.items():
            setattr(group, key, value)
        try:
            group.full_clean()
        except Exception as exc:
            raise ValidationFailed(str(exc)) from exc
        group.save()
        after = {k: getattr(group, k) for k in GROUP_FIELDS}
        record(
            action=KeyAction.GROUP_SAVED,
            actor=actor,
            org=org,
            target=group,
            changes={k: [before.get(k), after[k]] for k in GROUP_FIELDS if before.get(k) != after[k]},
        )
    return group


def address_group_delete(*, group: AddressGroup, actor: Actor) -> None:
    """Delete an empty address group (admin); a group that still has keys is a 409."""
    require(actor=actor, org=group.org, role=Role.ADMIN, what="keys.address_group_delete", target=group)
    with transaction.atomic():
        locked = AddressGroup.objects.select_for_update().get(pk=group.pk)
        if n := Key.objects.filter(address_group=locked).count():
            raise Conflict(GROUP_HAS_KEYS.format(name=locked.name, n=n), code="group_has_keys")
        record(action=KeyAction.GROUP_DELETED, actor=actor, org=locked.org, target=locked)
        locked.delete()
