"""Who did it: the actor attached to every service call and every audit row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetops.audit.models import ActorType

if TYPE_CHECKING:
    from fleetops.access.models import ApiToken


@dataclass(frozen=True)
class Actor:
    type: ActorType
    id: str = ""
    label: str = ""
    user_id: int | None = None
    is_superuser: bool = False
    interactive: bool = False

    def to_payload(self) -> dict[str, Any]:
        """Every field, as JSON-safe values, for a Celery task's arguments."""
        return {
            "type": str(self.type),
            "id": self.id,
            "label": self.label,
            "user_id": self.user_id,
            "is_superuser": self.is_superuser,
            "interactive": self.interactive,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Actor:
        """The inverse of `to_payload` (an unknown actor type raises ValueError)."""
        return cls(
            type=ActorType(payload["type"]),
            id=str(payload.get("id", "")),
            label=str(payload.get("label", "")),
            user_id=payload.get("user_id"),
            is_superuser=bool(payload.get("is_superuser", False)),
            interactive=bool(payload.get("interactive", False)),
        )

    @classmethod
    def for_user(cls, user: Any, *, interactive: bool = True) -> Actor:
        return cls(
            type=ActorType.USER,
            id=str(user.pk),
            label=user.get_username(),
            user_id=user.pk,
            is_superuser=bool(user.is_superuser),
            interactive=interactive,
        )

    @classmethod
    def for_token(cls, token: ApiToken) -> Actor:
        return cls(
            type=ActorType.API_TOKEN,
            id=str(token.pk),
            label=f"{token.user.get_username()} via token {token.name} ({token.key_id})",
            user_id=token.user_id,
        )

    @classmethod
    def scheduler(cls, name: str) -> Actor:
        return cls(type=ActorType.SCHEDULER, id=name, label=name)

    @classmethod
    def system(cls, name: str) -> Actor:
        return cls(type=ActorType.SYSTEM, id=name, label=name)

    @classmethod
    def anonymous(cls, label: str = "") -> Actor:
        return cls(type=ActorType.ANONYMOUS, label=label)

    @classmethod
    def from_request(cls, request: Any) -> Actor:
        """The actor of a DRF or Django request: the token when one authenticated it, else the user."""
        from fleetops.access.models import ApiToken

        auth = getattr(request, "auth", None)
        if isinstance(auth, ApiToken):
            return cls.for_token(auth)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            return cls.for_user(user, interactive=True)
        return cls.anonymous()
