"""An expired request offers no action again: not on the requester's pages, not on the approver's,
and a forged approve POST is refused with 409 and changes nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from migrations_app.choices import AuditAction, AuditOutcome, Role
from migrations_app.models import AuditEntry, HypervisorConnection, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.inventory import inventory_sync
from tests.conftest import REVIEW_EVERYTHING, install_policy, make_user, other_host_same_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def expired_request(live_portal, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # the portal's processes use the real ones
    install_policy(REVIEW_EVERYTHING)  # the request waits for an approver, whatever its VM
    conn = HypervisorConnection.objects.create(
        name="e2e", kind="simulator", options={"vms": 12, "state_file": str(tmp_path / "sim.json")})
    inventory_sync(connection=conn)
    alice = make_user("alice", Role.REQUESTER, teams=("team-web",))
    bob = make_user("bob", Role.APPROVER)
    for user in (alice, bob):
        user.set_password("pw-" + user.username)
        user.save()
    vm = VirtualMachine.objects.filter(owner_group__name="team-web", power_state="on").exclude(
        tags__icontains="sim:").order_by("pk").first()
    end = timezone.now() + timedelta(hours=1)
    mr = svc.migration_request_submit(requester=alice, vm=vm, kind="compute", target_host=other_host_same_cluster(vm),
                                      reason="window test", start_after=timezone.now() + timedelta(minutes=5),
                                      window_end=end)
    # The scheduler's expiry pass, run at a controlled time just after the window closed.
    assert svc.migration_request_expire_stale(now=end + timedelta(seconds=1)) == 1
    mr.refresh_from_db()
    assert mr.status == "expired"
    return mr


def test_an_expired_request_shows_no_actions_and_refuses_a_forged_approval(expired_request, login, live_portal):
    # expired_request first: its services push live events, which must happen before Playwright's loop runs here.
    mr = expired_request
    url = live_portal["url"]

    alice = login("alice", "pw-alice")
    alice.goto(f"{url}/requests/{mr.pk}/")
    assert alice.text_content("#request-status").strip() == "Expired"
    assert alice.text_content("#request-expired").startswith("Its window closed at")
    assert alice.locator("#request-panel form").count() == 0  # no withdraw, no approve, no reject
    alice.goto(f"{url}/requests/")
    row = alice.locator(f"tr[data-request-id='{mr.pk}']")
    assert row.locator(".status").inner_text().strip() == "Expired" and row.locator("form, button").count() == 0

    bob = login("bob", "pw-bob")
    bob.goto(f"{url}/requests/{mr.pk}/")
    assert bob.text_content("#request-status").strip() == "Expired"
    assert bob.locator("#request-panel button").count() == 0
    bob.goto(f"{url}/approvals/")
    bob.wait_for_selector("text=Nothing waits for you")
    assert bob.locator(f"[data-request-id='{mr.pk}']").count() == 0

    # A POST built by hand (API and page) is refused as a conflict, and nothing changes.
    token = next(c["value"] for c in bob.context.cookies() if c["name"] == "csrftoken")
    headers = {"X-CSRFToken": token, "Referer": url + "/"}
    answer = bob.request.post(f"{url}/api/requests/{mr.pk}/approve/", data={"comment": "late"}, headers=headers)
    assert answer.status == 409 and "already expired" in answer.json()["error"]
    answer = bob.request.post(f"{url}/requests/{mr.pk}/approve/", form={"comment": "late"},
                              headers={**headers, "HX-Request": "true"})
    assert answer.status == 409
    mr.refresh_from_db()
    assert mr.status == "expired" and mr.decided_by is None and not MigrationRun.objects.filter(request=mr).exists()
    refused = AuditEntry.objects.filter(request=mr, action=AuditAction.REQUEST_APPROVED)
    assert refused.count() == 2 and set(refused.values_list("outcome", flat=True)) == {AuditOutcome.DENIED}
    assert MigrationRequest.objects.get(pk=mr.pk).updated_at == mr.updated_at
    # Under Playwright's sync API this code has a database connection of its own; close it, or it
    # stays open and blocks dropping the test database.
    connection.close()

