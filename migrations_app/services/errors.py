"""Errors services raise for the caller to show: a refused action changes nothing."""

from __future__ import annotations


class ActionRefused(Exception):
    """The action is not allowed (permissions, state) or its input is invalid; nothing changed.

    ``field`` names the form field at fault, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None, denied: bool = False, conflict: bool = False):
        self.message = message
        self.field = field
        self.denied = denied  # an authorization refusal
        self.conflict = conflict  # the object's state does not allow it (decided, finished...)
        super().__init__(message)


def refuse_unless(verdict) -> None:
    """Raise the refusal an ``access.Verdict`` stands for: denied (rights) or conflict (state)."""
    if not verdict:
        raise ActionRefused(verdict.reason, denied=not verdict.conflict, conflict=verdict.conflict)
