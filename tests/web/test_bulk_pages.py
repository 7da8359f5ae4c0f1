"""The pages that act on several things: migrate the VMs selected in the inventory, approve the
requests selected in the queue."""

from __future__ import annotations

import pytest

from migrations_app.choices import RequestStatus
from migrations_app.models import MigrationRequest, VirtualMachine
from migrations_app.selectors import host_choices
from tests.conftest import client_for, other_cluster_host

S = RequestStatus
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]


def three_vms_and_a_common_host(conn):
    """Three running VMs of one cluster and a host all three can move to live."""
    vms = [vm for vm in VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("pk")
           if not any(t.startswith("sim:") for t in vm.tags)]
    for host in {c.obj for vm in vms for c in host_choices(vm) if c.valid}:
        fits = [vm for vm in vms if any(c.valid and c.obj == host for c in host_choices(vm))]
        if len(fits) >= 3:
            return fits[:3], host
    raise AssertionError("no host three VMs can move to")


def form(vms, host, **extra):
    return {"vms": [vm.pk for vm in vms], "kind": "compute", "target_host": host.pk, "reason": "rack work",
            "start_mode": "now", **extra}


def test_the_inventory_offers_selection_to_requesters_only(users, datacenter):
    assert 'name="vm"' in client_for(users["alice"]).get("/inventory/").content.decode()
    assert 'name="vm"' not in client_for(users["dave"]).get("/inventory/").content.decode()


def test_selected_vms_get_one_form_and_one_request_each(users, datacenter):
    vms, host = three_vms_and_a_common_host(datacenter)
    alice = client_for(users["alice"])
    page = alice.get("/vms/migrate/", {"vm": [vm.pk for vm in vms]})
    assert page.status_code == 200
    html = page.content.decode()
    assert all(vm.name in html for vm in vms) and f'value="{host.pk}"' in html
    response = alice.post("/vms/migrate/", form(vms, host))
    assert response.status_code == 302 and response["Location"] == "/requests/"
    assert sorted(MigrationRequest.objects.values_list("vm", "target_host", "status")) == sorted(
        (vm.pk, host.pk, S.PENDING_APPROVAL) for vm in vms)


def test_a_vm_that_cannot_move_refuses_the_form_and_names_it(users, datacenter):
    vms, host = three_vms_and_a_common_host(datacenter)
    far = other_cluster_host(vms[0])
    response = client_for(users["alice"]).post("/vms/migrate/", form(vms, far))
    assert response.status_code == 400
    html = response.content.decode()
    assert "Nothing was submitted" in html and vms[0].name in html and "in cluster" in html
    assert not MigrationRequest.objects.exists()


@pytest.mark.parametrize("change, text", [
    ({"reason": ""}, "This field is required"),
    ({"vms": []}, "select at least one VM"),
    ({"start_mode": "window"}, "give both ends of the window"),
])
def test_the_form_validates_like_the_single_one(users, datacenter, change, text):
    vms, host = three_vms_and_a_common_host(datacenter)
    response = client_for(users["alice"]).post("/vms/migrate/", {**form(vms, host), **change})
    assert response.status_code == 400 and text in response.content.decode()
    assert not MigrationRequest.objects.exists()


def test_an_auditor_cannot_open_the_form(users, datacenter):
    assert client_for(users["dave"]).get("/vms/migrate/", {"vm": [1]}).status_code == 403


def test_approve_selected(users, datacenter):
    vms, host = three_vms_and_a_common_host(datacenter)
    client_for(users["alice"]).post("/vms/migrate/", form(vms, host))
    ids = list(MigrationRequest.objects.values_list("pk", flat=True))
    erin = client_for(users["erin"])
    queue = erin.get("/approvals/").content.decode()
    assert all(f'name="request" value="{pk}"' in queue for pk in ids)
    response = erin.post("/requests/approve/", {"request": ids, "comment": "go", "next": "/approvals/?scope=all"},
                         follow=True)
    assert "Approved: " in response.content.decode()
    assert set(MigrationRequest.objects.values_list("status", flat=True)) == {S.QUEUED}


def test_approve_selected_is_all_or_nothing_and_says_why(users, datacenter):
    vms, host = three_vms_and_a_common_host(datacenter)
    client_for(users["alice"]).post("/vms/migrate/", form(vms, host))
    ids = list(MigrationRequest.objects.order_by("pk").values_list("pk", flat=True))
    client_for(users["erin"]).post("/requests/approve/", {"request": ids[:1]})
    response = client_for(users["erin"]).post("/requests/approve/", {"request": ids}, follow=True)
    html = response.content.decode()
    assert "nothing was approved" in html and f"#{ids[0]}" in html and "already queued" in html
    assert list(MigrationRequest.objects.order_by("pk").values_list("status", flat=True)) == [
        S.QUEUED, S.PENDING_APPROVAL, S.PENDING_APPROVAL]
    # a requester may not use it at all
    assert client_for(users["alice"]).post("/requests/approve/", {"request": ids}).status_code == 403


def test_the_form_says_before_any_target_which_selected_vms_cannot_move(users, datacenter):
    vms, host = three_vms_and_a_common_host(datacenter)
    off, busy, fine = vms
    VirtualMachine.objects.filter(pk=off.pk).update(power_state="off")
    alice = client_for(users["alice"])
    assert alice.post("/vms/migrate/", form([busy], host)).status_code == 302  # busy now has an open request
    number = MigrationRequest.objects.get(vm=busy).pk
    html = alice.get("/vms/migrate/", {"vm": [vm.pk for vm in vms]}).content.decode()
    rows = {vm.name: html.split(f"{vm.name}</td>", 1)[1].split("</tr>", 1)[0] for vm in vms}
    assert "no: powered off; a live migration needs it running" in rows[off.name]
    assert f"no: already has an open request (#{number}, pending approval)" in rows[busy.name]
    assert "yes, to a valid target" in rows[fine.name]
