"""The golden path in a real browser: alice requests, bob approves, alice's open page shows the
migration advancing to succeeded without a reload, dave finds every step in the audit log."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.services.inventory import inventory_sync
from tests.conftest import make_user

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("review_everything")]


@pytest.fixture
def demo_world(live_portal, tmp_path, settings):
    from django.conf import global_settings

    # The portal processes verify passwords with the real hashers.
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    conn = HypervisorConnection.objects.create(
        name="e2e", kind="simulator",
        # Slow enough that progress is seen moving for a few seconds.
        options={"speed": 3, "tick_s": 0.1, "vms": 12, "state_file": str(tmp_path / "sim.json")},
    )
    inventory_sync(connection=conn)
    users = {
        "alice": make_user("alice", Role.REQUESTER, teams=("team-web",)),
        "bob": make_user("bob", Role.APPROVER),
        "dave": make_user("dave", Role.AUDITOR),
    }
    for user in users.values():
        user.set_password("pw-" + user.username)
        user.save()
    vm = VirtualMachine.objects.filter(owner_group__name="team-web", power_state="on").exclude(
        tags__icontains="sim:").order_by("-memory_bytes").first()
    return {"users": users, "vm": vm}


def test_request_approve_watch_live_and_audit(login, live_portal, demo_world):
    vm = demo_world["vm"]
    # bob keeps the approval queue open; it fills in live when alice submits.
    bob = login("bob", "pw-bob")
    bob.goto(live_portal["url"] + "/approvals/")
    bob.wait_for_selector("#live-state.on")
    bob.wait_for_selector("text=Nothing waits for you")
    bob.evaluate("window.__notReloaded = true")

    alice = login("alice", "pw-alice")
    alice.click("text=Inventory")
    alice.fill("input[name=q]", vm.name)
    alice.click(f"a:text-is('{vm.name}')")
    alice.click("text=Migrate…")
    # Only valid hosts can be chosen; pick the first one offered.
    option = alice.locator("#id_target_host option:not([disabled]):not([value=''])").first
    target_name = option.inner_text().strip()
    alice.select_option("#id_target_host", value=option.get_attribute("value"))
    alice.fill("textarea[name=reason]", "Firmware update on the source host")
    alice.click("button:text('Submit request')")
    alice.wait_for_url(re.compile(r"/requests/\d+/$"))
    request_id = int(re.search(r"/requests/(\d+)/", alice.url).group(1))
    bob.wait_for_selector(f"button:text('Approve #{request_id}')")
    assert bob.evaluate("window.__notReloaded") is True
    assert alice.text_content("#request-status").strip() == "Pending approval"

    bob.click(f"button:text('Approve #{request_id}')")
    bob.wait_for_selector(f"text=Request #{request_id}: done.")

    # alice's page was never reloaded: mark it, and check the mark survives.
    alice.evaluate("window.__notReloaded = true")
    alice.wait_for_selector("#run-progress", timeout=15000)
    seen = set()
    percents = []
    deadline_status = "Succeeded"
    for _ in range(600):
        status = alice.text_content("#request-status").strip()
        percent = float(alice.text_content("#run-percent"))
        percents.append(percent)
        seen.add(alice.get_attribute("#run-phase", "data-phase"))
        if status == deadline_status:
            break
        alice.wait_for_timeout(50)
    assert status == "Succeeded", (status, percents[-5:])
    assert alice.evaluate("window.__notReloaded") is True
    assert percents[-1] == 100.0
    assert alice.evaluate("document.getElementById('run-bar').style.width") == "100%"
    assert any(0 < p < 100 for p in percents), "no intermediate progress was shown"
    assert percents == sorted(percents), "progress went backwards on the page"
    assert "memory_precopy" in seen or "switchover" in seen
    assert alice.text_content("#run-rate") and target_name.split(" ")[0] in alice.text_content("#request-panel")

    mr = MigrationRequest.objects.get(pk=request_id)
    assert mr.status == "succeeded" and VirtualMachine.objects.get(pk=vm.pk).host.name == target_name.split(" ")[0]

    dave = login("dave", "pw-dave")
    dave.goto(live_portal["url"] + f"/audit/?request={request_id}")
    table = dave.text_content("table.audit")
    for action in ("Request submitted", "Request approved", "Run queued", "Run started", "Run succeeded"):
        assert action in table, action
    assert "alice" in table and "bob" in table and vm.name in table
    assert User.objects.filter(username="dave").exists()
