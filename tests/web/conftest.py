"""Fixtures of the web tests."""

from __future__ import annotations

import pytest

from tests.simdc import evacuation_state, simulated_connection


@pytest.fixture
def evac_dc(tmp_path, db):
    """One cluster: src.lab holds four small VMs that can move and one (pinned-local) that cannot."""
    return simulated_connection(tmp_path / "evac.json", evacuation_state(4))
