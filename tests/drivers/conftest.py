"""One contract suite, every driver: the ``harness`` fixture runs each test against each peer.

Peers that need a lab (vcsim, the libvirt lab) start it once per session through the project's own
lab scripts; if a lab cannot start, its tests fail with the lab's own error: they never skip.
Tests marked with ``harness.required(Capability.X)`` run only against drivers that declare X, since
the test does not apply to the others (vcsim has no cancellable tasks, for example).
"""

from __future__ import annotations

import importlib
import os

import pytest

# kind -> "module:factory"; a factory is a generator fixture body yielding a Harness.
HARNESS_FACTORIES = {
    "simulator": "tests.drivers.peer_simulator:harness_factory",
    "libvirt": "tests.drivers.peer_libvirt:harness_factory",
    "vcenter": "tests.drivers.peer_vcenter:harness_factory",
}

# DRIVER_KINDS=simulator,vcenter narrows the run (make targets use it); default: every kind.
SELECTED = [k for k in os.environ.get("DRIVER_KINDS", ",".join(HARNESS_FACTORIES)).split(",") if k]


def _factory(kind: str):
    module_name, name = HARNESS_FACTORIES[kind].split(":")
    return getattr(importlib.import_module(module_name), name)


def _capabilities(kind: str):
    return _factory(kind).capabilities


def pytest_generate_tests(metafunc):
    if "harness" not in metafunc.fixturenames:
        return
    needed = getattr(metafunc.function, "required_capability", None)
    kinds = [k for k in SELECTED if needed is None or needed in _capabilities(k)]
    metafunc.parametrize("harness", kinds, indirect=True, scope="session")


_started: dict = {}


@pytest.fixture(scope="session")
def harness(request):
    kind = request.param
    if kind not in _started:
        gen = _factory(kind)()
        _started[kind] = (gen, next(gen))
        request.session.config.add_cleanup(lambda g=gen: next(g, None))
    return _started[kind][1]
