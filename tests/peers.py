"""The real hypervisor peers the tests run against, each started at most once per test session.

A peer is a driver with what stands behind it: the simulator, vcsim (lab/vcsim) or the KVM lab
(lab/kvm). Its harness factory (a generator yielding a ``tests.drivers.harness.Harness``) starts
the lab through the project's own scripts; if a lab cannot start, the tests that need it fail with
the lab's own error: they never skip. ``DRIVER_KINDS=simulator,vcenter`` narrows a run to some
peers (tests of the others are deselected, not skipped); by default every peer runs.
"""

from __future__ import annotations

import importlib
import os

HARNESS_FACTORIES = {
    "simulator": "tests.drivers.peer_simulator:harness_factory",
    "libvirt": "tests.drivers.peer_libvirt:harness_factory",
    "vcenter": "tests.drivers.peer_vcenter:harness_factory",
}

SELECTED = [k for k in os.environ.get("DRIVER_KINDS", ",".join(HARNESS_FACTORIES)).split(",") if k]

_started: dict = {}


def factory(kind: str):
    module_name, name = HARNESS_FACTORIES[kind].split(":")
    return getattr(importlib.import_module(module_name), name)


def capabilities(kind: str):
    return factory(kind).capabilities


def start(kind: str, config):
    """The peer's harness, started on first use and stopped when the session ends."""
    if kind not in _started:
        gen = factory(kind)()
        _started[kind] = (gen, next(gen))
        config.add_cleanup(lambda g=gen: next(g, None))
    return _started[kind][1]
