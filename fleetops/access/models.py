from __future__ import annotations

import hashlib
from datetime import datetime

from django.conf import settings
from django.db import models


class Role(models.TextChoices):
    """A member's role in one organization. Roles are ordered: each includes the ones below it.

    viewer   read everything in the organization
    operator + start / stop / update / retry
    admin    + terminate, overrides, resets, managing other members' tokens
    """

    VIEWER = "viewer", "Viewer"
    OPERATOR = "operator", "Operator"
    ADMIN = "admin", "Admin"

    @classmethod
    def rank(cls, role: str) -> int:
        return _RANK[cls(role)]

    @classmethod
    def at_least(cls, role: str | None, required: str) -> bool:
        return role is not None and cls.rank(role) >= cls.rank(required)

    @classmethod
    def lowest(cls, *roles: str) -> Role:
        return cls(min(roles, key=cls.rank))


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


class Organization(models.Model):
    """A team that runs fleets, validators or indexers. Every domain row belongs to exactly one;
    every query is scoped to the organizations of the actor."""

    name = models.CharField(max_length=200, unique=True)
    slug = models.SlugField(max_length=60, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A user's role in one organization. A user may belong to several organizations."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["org__name", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["user", "org"], name="membership_one_per_user_org"),
            models.CheckConstraint(condition=models.Q(role__in=Role.values), name="membership_role_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.user} · {self.org} · {self.role}"


class ApiToken(models.Model):
    """A per-user token for automation, bound to one organization and a role no higher than the
    user's there. Only a SHA-256 of the secret is stored; the plaintext is shown once at creation.

    The effective role of a request is the lower of the token's role and the user's current
    membership role, so demoting a user demotes their tokens at once.
    """

    PREFIX = "fo"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    org = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_tokens")
    role = models.CharField(max_length=16, choices=Role.choices)
    name = models.CharField(max_length=100)
    key_id = models.CharField(max_length=16, unique=True, help_text="Public part of the token, safe to log.")
    secret_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_reason = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        verbose_name = "API token"
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(role__in=Role.values), name="apitoken_role_valid")
        ]
        indexes = [models.Index(fields=["org", "user"], name="apitoken_org_user")]

    def __str__(self) -> str:
        return f"{self.name} ({self.PREFIX}_{self.key_id}_…)"

    @staticmethod
    def hash_secret(secret: str) -> str:
        # Tokens carry 256 bits of entropy, so a fast hash is enough: there is nothing to brute-force.
        return hashlib.sha256(secret.encode()).hexdigest()

    def is_active(self, *, at: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > at)
