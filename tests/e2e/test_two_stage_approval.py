"""A two-stage approval in a real browser, under the shipped risk-based policy: alice asks to move a
production VM, bob signs the first stage, erin the second. Alice's open page shows stage 2 waiting,
then the migration running to succeeded, without a reload."""

from __future__ import annotations

import re

import pytest

from migrations_app.choices import Role
from migrations_app.models import (
    ApprovalPolicy,
    HypervisorConnection,
    MigrationRequest,
    RequestApproval,
    VirtualMachine,
)
from migrations_app.policy.defaults import DEFAULT_POLICY_NAME
from migrations_app.services.inventory import inventory_sync
from migrations_app.services.policies import install_default_policy
from tests.conftest import make_user

pytestmark = pytest.mark.e2e


@pytest.fixture
def world(live_portal, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # the portal verifies with the real ones
    install_default_policy()
    assert ApprovalPolicy.objects.get(active=True).name == DEFAULT_POLICY_NAME
    conn = HypervisorConnection.objects.create(
        name="e2e", kind="simulator",
        options={"speed": 20, "tick_s": 0.05, "vms": 12, "state_file": str(tmp_path / "sim.json")},
    )
    inventory_sync(connection=conn)
    users = {
        "alice": make_user("alice", Role.REQUESTER, teams=("team-web",)),
        "bob": make_user("bob", Role.APPROVER),
        "erin": make_user("erin", Role.APPROVER),
    }
    for user in users.values():
        user.set_password("pw-" + user.username)
        user.save()
    vm = (VirtualMachine.objects.filter(owner_group__name="team-web", power_state="on", tags__icontains="env:production")
          .exclude(tags__icontains="sim:").order_by("memory_bytes").first())
    assert vm is not None, "the simulated datacenter has a running production VM of team-web"
    return {"vm": vm}


def approve_from_queue(page, url: str, request_id: int) -> None:
    page.goto(url + "/approvals/")
    page.click(f"button:text('Approve #{request_id}')")
    page.wait_for_selector(f"text=Request #{request_id}: done.")


def test_two_approvers_sign_two_stages_while_the_requester_watches(login, live_portal, world):
    url, vm = live_portal["url"], world["vm"]
    alice = login("alice", "pw-alice")
    alice.goto(url + f"/vms/{vm.pk}/migrate/")
    option = alice.locator("#id_target_host option:not([disabled]):not([value=''])").first
    alice.select_option("#id_target_host", value=option.get_attribute("value"))
    alice.fill("textarea[name=reason]", "Move off the host before its firmware update")
    alice.click("button:text('Submit request')")
    alice.wait_for_url(re.compile(r"/requests/\d+/$"))
    request_id = int(re.search(r"/requests/(\d+)/", alice.url).group(1))
    alice.wait_for_selector("#live-state.on")
    assert alice.get_attribute("#request-stages li[data-stage='1']", "data-state") == "current"
    assert "Production VMs need two distinct approvers" in alice.text_content("#request-panel")
    alice.evaluate("window.__notReloaded = true")

    bob = login("bob", "pw-bob")
    approve_from_queue(bob, url, request_id)
    # alice's open page shows stage 2 waiting, with bob's signature on stage 1, without a reload.
    alice.wait_for_selector("#request-stages li[data-stage='2'][data-state='current']")
    assert "(1 of 1: bob)" in alice.text_content("#request-stages li[data-stage='1']")
    assert alice.text_content("#request-status").strip() == "Pending approval"
    assert alice.evaluate("window.__notReloaded") is True
    # bob signed stage 1: stage 2 is not his, so his "Pending for me" queue is empty.
    bob.goto(url + "/approvals/")
    bob.wait_for_selector("text=Nothing waits for you")

    erin = login("erin", "pw-erin")
    approve_from_queue(erin, url, request_id)
    alice.wait_for_selector("#request-status[data-status='succeeded']", timeout=60000)
    assert alice.evaluate("window.__notReloaded") is True
    assert alice.text_content("#request-status").strip() == "Succeeded"

    mr = MigrationRequest.objects.get(pk=request_id)
    assert mr.status == "succeeded" and mr.decided_by.username == "erin"
    assert list(RequestApproval.objects.filter(request=mr).values_list("stage", "approver__username")) == [
        (0, "bob"), (1, "erin")]
