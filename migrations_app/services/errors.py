"""Errors services raise for the caller to show: a refused action changes nothing."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class Refusal:
    """Why one item of a batch was refused: its place in the batch (0-based), what it names (a
    VM's name, a request's number) and the refusal the one-item action would have raised."""

    index: int
    label: str
    error: ActionRefused


class BatchRefused(ActionRefused):
    """Items of a batch were refused, so the whole batch was: nothing changed. ``refusals`` names
    every refused item and why (in batch order); the message says it all in one line."""

    def __init__(self, refusals: list[Refusal]):
        self.refusals = sorted(refusals, key=lambda r: r.index)
        denied = any(r.error.denied for r in self.refusals)
        conflict = not denied and any(r.error.conflict for r in self.refusals)
        message = "; ".join(f"{r.label}: {r.error.message}" for r in self.refusals)
        super().__init__(f"nothing was done: {message}", denied=denied, conflict=conflict)


class NotAuthenticated(Exception):
    """The credentials a call sent were refused (a 401), or, ``locked``, its address is locked out
    after too many failures (a 429) and they were not even looked at."""

    def __init__(self, message: str, *, locked: bool = False):
        self.message = message
        self.locked = locked
        super().__init__(message)
