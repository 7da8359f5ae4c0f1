"""One contract suite, every driver: the ``harness`` fixture runs each test against each peer
(see tests/peers.py for how peers are chosen and started).

Tests marked with ``harness.required(Capability.X)`` run only against drivers that declare X, since
the test does not apply to the others (vcsim has no cancellable tasks, for example).
"""

from __future__ import annotations

import pytest

from tests import peers


def pytest_generate_tests(metafunc):
    if "harness" not in metafunc.fixturenames:
        return
    needed = getattr(metafunc.function, "required_capability", None)
    kinds = [k for k in peers.SELECTED if needed is None or needed in peers.capabilities(k)]
    metafunc.parametrize("harness", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def harness(request):
    return peers.start(request.param, request.session.config)
