"""Errors services raise for the caller to show: a refused action changes nothing."""

from __future__ import annotations


class ActionRefused(Exception):
    """The action is not allowed (permissions, state) or its input is invalid; nothing changed.

    ``field`` names the form field at fault, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None, denied: bool = False):
        self.message = message
        self.field = field
        self.denied = denied  # True when it is an authorization refusal (audited as such)
        super().__init__(message)
