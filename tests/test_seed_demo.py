"""The demo seed shows each outcome of the shipped policy, and two approvers can sign production."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from migrations_app import selectors
from migrations_app.models import MigrationRequest

pytestmark = pytest.mark.django_db


def test_the_seed_leaves_one_request_per_outcome_of_the_shipped_policy():
    call_command("seed_demo", "--password", "pw-demo-123")
    rules = {mr.approval_plan["rule"]: mr for mr in MigrationRequest.objects.all()}
    assert rules["Small same-cluster compute moves are approved automatically"].status == "queued"
    assert rules["Everything else needs one approver"].status == "pending_approval"
    production = rules["Production VMs need two distinct approvers"]
    assert production.status == "pending_approval" and len(production.stages) == 2
    assert {u.username for u in selectors.current_approvers(production)} == {"bob", "erin"}
    call_command("seed_demo", "--password", "pw-demo-123")  # idempotent: no second set of requests
    assert MigrationRequest.objects.count() == 3
    assert User.objects.get(username="alice").check_password("pw-demo-123")
