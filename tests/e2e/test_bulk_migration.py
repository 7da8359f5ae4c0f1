"""Many VMs at once in a real browser: alice ticks three VMs in the inventory and asks for one
migration for all of them; bob ticks the three requests and approves them together; the three
runs succeed on the simulator."""

from __future__ import annotations

import re

import pytest

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.services.inventory import inventory_sync
from tests.conftest import make_user
from tests.web.test_bulk_pages import three_vms_and_a_common_host

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("review_everything")]


@pytest.fixture
def world(live_portal, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # the portal checks real hashes
    conn = HypervisorConnection.objects.create(
        name="e2e", kind="simulator", options={"speed": 60, "tick_s": 0.05, "vms": 12,
                                               "state_file": str(tmp_path / "sim.json")})
    inventory_sync(connection=conn)
    users = {"alice": make_user("alice", Role.REQUESTER, teams=("team-web", "team-data", "team-ops")),
             "bob": make_user("bob", Role.APPROVER)}
    for user in users.values():
        user.set_password("pw-" + user.username)
        user.save()
    return conn


def test_select_three_vms_request_once_approve_selected_and_all_succeed(login, live_portal, world):
    vms, host = three_vms_and_a_common_host(world)
    alice = login("alice", "pw-alice")
    alice.goto(live_portal["url"] + "/inventory/")
    for vm in vms:
        alice.check(f"input[name=vm][value='{vm.pk}']")
    alice.click("#migrate-selected-button")
    alice.wait_for_url(re.compile(r"/vms/migrate/\?"))
    assert alice.locator("#selected-vms tbody tr").count() == 3
    alice.select_option("#id_target_host", value=str(host.pk))
    alice.fill("textarea[name=reason]", "Rack 12 power work")
    alice.click("button:text('Submit 3 requests')")
    alice.wait_for_url(re.compile(r"/requests/$"))
    assert "3 requests submitted" in alice.text_content(".flash")
    requests = list(MigrationRequest.objects.filter(vm__in=vms).order_by("pk"))
    assert [(r.status, r.target_host_id) for r in requests] == [("pending_approval", host.pk)] * 3

    bob = login("bob", "pw-bob")
    bob.goto(live_portal["url"] + "/approvals/")
    for mr in requests:
        bob.check(f"input[name=request][value='{mr.pk}']")
    bob.fill("#approve-selected input[name=comment]", "all three, go")
    bob.click("#approve-selected-button")
    bob.wait_for_selector("text=Approved: ")

    # alice's list follows the requests live (websocket pushes re-render it): wait until all
    # three rows show a final status.
    ids = [r.pk for r in requests]
    final = ["succeeded", "failed", "errored", "cancelled", "expired"]
    alice.wait_for_function(
        """([ids, final]) => ids.every((id) => {
            const badge = document.querySelector(`tr[data-request-id="${id}"] .status`);
            return badge && final.some((s) => badge.classList.contains("status-" + s));
        })""", arg=[ids, final], timeout=120_000)
    statuses = list(MigrationRequest.objects.filter(pk__in=ids).order_by("pk").values_list("status", flat=True))
    assert statuses == ["succeeded"] * 3, (statuses, live_portal["logs"]["worker"].read_text()[-2000:])
    assert set(VirtualMachine.objects.filter(pk__in=[vm.pk for vm in vms]).values_list("host", flat=True)) == {host.pk}
