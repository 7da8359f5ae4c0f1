"""A real live migration on the KVM lab, requested, approved and watched in the browser: the
progress the requester sees moves monotonically from 0 to 100 through the phases, the guest keeps
running, and the portal shows the true final placement."""

from __future__ import annotations

import json
import re

import pytest

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.selectors import host_choices
from migrations_app.services.inventory import inventory_sync
from tests import peers
from tests.conftest import make_user

pytestmark = [pytest.mark.e2e, pytest.mark.peer("libvirt"), pytest.mark.usefixtures("review_everything")]
MiB = 1024**2


def test_throttled_live_migration_progress_in_the_browser(request, login, api, live_portal, settings):
    from django.conf import global_settings

    lab = peers.start("libvirt", request.session.config)  # the KVM lab, shared with the driver suite
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    from tests.drivers.peer_libvirt import lab_env

    options = json.loads(lab_env()["LAB_KVM_DRIVER_OPTIONS"])
    # Throttled so the move lasts several seconds: 64 MiB of guest memory at 12 MiB/s.
    conn = HypervisorConnection.objects.create(
        name="kvm-lab", kind="libvirt", is_lab=True, options={**options, "bandwidth_bytes_per_s": 12 * MiB})
    inventory_sync(connection=conn)
    alice = make_user("alice", Role.REQUESTER)
    bob = make_user("bob", Role.APPROVER)
    for user in (alice, bob):
        user.set_password("pw-" + user.username)
        user.save()
    vm = next(v for v in VirtualMachine.objects.filter(connection=conn, power_state="on").order_by("name")
              if not any(t.startswith("lab:") for t in v.tags) and any(c.valid for c in host_choices(v)))
    vm.owner_group = alice.groups.get(name="requester")
    vm.save(update_fields=["owner_group"])
    target = next(c.obj for c in host_choices(vm) if c.valid)
    ticks_before = lab.ticks(vm.ref)

    page = login("alice", "pw-alice")
    created = api("alice", "pw-alice")("/api/requests/", {
        "vm_id": vm.pk, "target_host_id": target.pk, "reason": "KVM live migration in the browser"})
    page.goto(live_portal["url"] + f"/requests/{created['id']}/")
    page.evaluate("window.__notReloaded = true")
    api("bob", "pw-bob")(f"/api/requests/{created['id']}/approve/", {})

    page.wait_for_selector("#run-progress", timeout=20000)
    samples = []
    for _ in range(1200):
        status = page.text_content("#request-status").strip()
        text = page.text_content("#run-percent")
        if text:
            samples.append((float(text), page.get_attribute("#run-phase", "data-phase")))
        if status in ("Succeeded", "Failed", "Errored"):
            break
        page.wait_for_timeout(50)
    mr = MigrationRequest.objects.get(pk=created["id"])
    assert status == "Succeeded", (status, mr.run.explanation)
    assert page.evaluate("window.__notReloaded") is True
    percents = [p for p, _ in samples]
    assert percents == sorted(percents), "progress went backwards in the browser"
    stored = list(mr.run.events.values_list("seq", "phase", "percent"))
    assert percents[-1] == 100.0 and len({p for p in percents if 0 < p < 100}) >= 3, (percents, stored)
    phases = [ph for _, ph in samples]
    assert "memory_precopy" in phases and phases[-1] == "done"
    assert (mr.run.finished_at - mr.run.started_at).total_seconds() > 3, "the throttle did not slow the move"

    # The hypervisor and the portal agree on the final placement, and the guest kept running.
    assert lab.independent_placement(vm.ref).host_ref == target.ref
    assert VirtualMachine.objects.get(pk=vm.pk).host == target
    assert target.name in page.text_content("#request-panel")
    assert lab.ticks(vm.ref) > ticks_before and lab.guest_alive(vm.ref)
    assert re.search(r"\d+ ms", page.text_content("#request-panel")), "downtime not shown"
