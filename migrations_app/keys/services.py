"""Every write of the key re-stake lifecycle, in one import.

The writes live along their seams; callers (API views, admin, commands, tests) import them here:

- `migrations_app.keys.lifecycle` — the operator's moves into `scheduled`: migrate keys to a group
  (`key_migrate_to_group`), manual retry (`key_migration_retry`, `keys_migration_retry`), and the
  scheduler's cool-down reset (`keys_cooldown_reset`);
- `migrations_app.keys.verdicts` — the engine's verdicts on stake transactions (`stake_txs_resolve`);
- `migrations_app.keys.groups` — the admin's setup: `key_config_update`, `address_group_save`,
  `address_group_delete`;
- `migrations_app.keys.common` — audit actions, result and verdict types, messages, the role gate.

Every function is keyword-only, takes the `actor` (never a role: the role is derived from the actor
by `fleetops.access.roles` and checked before the transaction, so a refusal is audited), runs in one
transaction and writes its audit rows inside it. Status changes go through the transition kernel
(`fleetops.lib.transition`). The schedule and verification import `lifecycle`/`verdicts` directly,
never this module, and kick nothing by import: no import cycle.
"""

from __future__ import annotations

from fleetops.lib.errors import DomainError
from migrations_app.keys.common import (
    ADMIN_REQUIRED,
    FAILED_EVENT,
    MAX_KEY_IDS,
    NOT_A_MEMBER,
    OPERATOR_REQUIRED,
    KeyAction,
    MigrateResult,
    ResolveStats,
    RetryResult,
    Verdict,
    max_attempts_for,
)
from migrations_app.keys.groups import (
    GROUP_HAS_KEYS,
    address_group_delete,
    address_group_save,
    key_config_update,
)
from migrations_app.keys.lifecycle import (
    NOT_RETRYABLE,
    SAME_GROUP,
    key_migrate_to_group,
    key_migration_retry,
    keys_cooldown_reset,
    keys_migration_retry,
)
from migrations_app.keys.selectors import KeyFilter
from migrations_app.keys.verdicts import stake_txs_resolve

__all__ = [
    "ADMIN_REQUIRED",
    "FAILED_EVENT",
    "GROUP_HAS_KEYS",
    "MAX_KEY_IDS",
    "NOT_A_MEMBER",
    "NOT_RETRYABLE",
    "OPERATOR_REQUIRED",
    "SAME_GROUP",
    "DomainError",
    "KeyAction",
    "KeyFilter",
    "MigrateResult",
    "ResolveStats",
    "RetryResult",
    "Verdict",
    "address_group_delete",
    "address_group_save",
    "key_config_update",
    "key_migrate_to_group",
    "key_migration_retry",
    "keys_cooldown_reset",
    "keys_migration_retry",
    "max_attempts_for",
    "stake_txs_resolve",
]
