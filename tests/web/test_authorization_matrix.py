"""One authorization matrix: every page, API endpoint and websocket subscription, against every role
and against another user's object. No cell may succeed where the matrix says no."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from migrations_app.choices import TERMINAL
from migrations_app.models import AuditEntry, MigrationRequest, MigrationRun, VirtualMachine
from migrations_app.services import requests as svc
from migrations_app.services.api_tokens import api_token_create
from tests.conftest import other_host_same_cluster, running_vm

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("review_everything")]

ROLES = ("anonymous", "alice", "mallory", "erin", "dave", "carol")  # owner, stranger, approver, auditor, admin
EVERYONE = set(ROLES) - {"anonymous"}


def client(users, role) -> Client:
    c = Client()
    if role != "anonymous":
        c.force_login(users[role])
    return c


@pytest.fixture
def world(users, datacenter):
    vm = running_vm(datacenter)  # owned by team-web: alice's team, not mallory's
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="matrix")
    other = running_vm(datacenter, exclude_tags=("sim:", "env:production"))
    if other == vm:
        other = VirtualMachine.objects.filter(owner_group__name="team-web", power_state="on").exclude(pk=vm.pk).first()
    ran = svc.migration_request_submit(requester=users["alice"], vm=other, kind="compute",
                                       target_host=other_host_same_cluster(other), reason="matrix run")
    svc.migration_request_approve(request=ran, actor=users["erin"])
    entry = AuditEntry.objects.filter(request=mr).first()
    return {"vm": vm, "mr": mr, "run": MigrationRun.objects.get(request=ran), "entry": entry}


# (url template, roles that may read it)
READS = [
    ("/inventory/", EVERYONE),
    ("/requests/", EVERYONE),
    ("/vms/{vm}/", {"alice", "erin", "dave", "carol"}),
    ("/vms/{vm}/migrate/", {"alice", "carol"}),
    ("/vms/{vm}/migrate/datastores/", {"alice", "erin", "dave", "carol"}),
    ("/requests/{mr}/", {"alice", "erin", "dave", "carol"}),
    ("/approvals/", {"erin", "carol"}),
    ("/notifications/", EVERYONE),
    ("/tokens/", EVERYONE),
    ("/audit/", {"dave", "carol"}),
    ("/audit/export.json", {"dave", "carol"}),
    ("/api/requests/", EVERYONE),
    ("/api/requests/{mr}/", {"alice", "erin", "dave", "carol"}),
    ("/api/runs/{run}/events/", {"alice", "erin", "dave", "carol"}),
    ("/audit/export.csv", {"dave", "carol"}),
    ("/audit/{entry}/", {"dave", "carol"}),
]


@pytest.mark.parametrize("url, allowed", READS, ids=[r[0] for r in READS])
def test_every_read_against_every_role(users, world, url, allowed):
    path = url.format(vm=world["vm"].pk, mr=world["mr"].pk, run=world["run"].pk, entry=world["entry"].pk)
    for role in ROLES:
        response = client(users, role).get(path)
        if role in allowed:
            assert response.status_code == 200, (role, path, response.status_code)
        else:
            assert response.status_code in (302, 401, 403, 404), (role, path, response.status_code)
            if response.status_code == 302:
                assert response["Location"].startswith("/login/"), (role, path)


# (action, roles that may do it to alice's pending request): the approver of the stage decides; an
# admin only when the admin bypass is on (PORTAL["ADMIN_BYPASS_APPROVAL"], default off).
WRITES = [
    ("approve", {"erin"}, {"erin", "carol"}),
    ("reject", {"erin"}, {"erin", "carol"}),
    ("cancel", {"alice", "carol"}, {"alice", "carol"}),
]


@pytest.mark.parametrize("action, allowed, allowed_with_bypass", WRITES, ids=[w[0] for w in WRITES])
@pytest.mark.parametrize("via", ["page", "api", "token"])
@pytest.mark.parametrize("bypass", [False, True], ids=["bypass-off", "bypass-on"])
def test_every_decision_against_every_role(users, datacenter, settings, action, allowed, allowed_with_bypass, via,
                                           bypass):
    settings.PORTAL = {**settings.PORTAL, "ADMIN_BYPASS_APPROVAL": bypass}
    allowed = allowed_with_bypass if bypass else allowed
    vm = running_vm(datacenter)
    # "token": each role's personal API token, and no session (a token has its user's rights, no more).
    tokens = {role: api_token_create(user=users[role], name="matrix", days=1)[1] for role in EVERYONE}
    for role in ROLES:
        # Setup only: retire the previous round's request so the VM can be requested again.
        MigrationRequest.objects.filter(vm=vm).exclude(status__in=TERMINAL).update(status="cancelled")
        mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                          target_host=other_host_same_cluster(vm), reason="matrix")
        c = client(users, role) if via != "token" else Client(
            headers={"Authorization": f"Bearer {tokens[role]}"} if role in tokens else {})
        if via == "page":
            c.post(f"/requests/{mr.pk}/{action}/", {"reason": "because", "comment": "ok"})
        else:
            c.post(f"/api/requests/{mr.pk}/{action}/", data=json.dumps({"reason": "because"}),
                   content_type="application/json")
        mr.refresh_from_db()
        changed = mr.status != "pending_approval"
        assert changed == (role in allowed), (role, action, via, mr.status)


def test_refused_reads_are_audited(users, world):
    before = AuditEntry.objects.filter(outcome="denied").count()
    client(users, "mallory").get(f"/api/requests/{world['mr'].pk}/")
    client(users, "mallory").get(f"/requests/{world['mr'].pk}/")
    assert AuditEntry.objects.filter(outcome="denied", actor=users["mallory"]).count() == before + 2


def test_submitting_for_someone_elses_vm_is_refused_on_every_path(users, world):
    vm = world["vm"]
    MigrationRequest.objects.filter(pk=world["mr"].pk).update(status="cancelled")
    target = other_host_same_cluster(vm)
    for role in ("anonymous", "mallory", "erin", "dave"):
        c = client(users, role)
        c.post(f"/vms/{vm.pk}/migrate/", {"kind": "compute", "target_host": target.pk, "reason": "x",
                                          "start_mode": "now"})
        c.post("/api/requests/", data=json.dumps({"vm_id": vm.pk, "target_host_id": target.pk, "reason": "x"}),
               content_type="application/json")
        assert not MigrationRequest.objects.filter(vm=vm, requester__username=role).exists(), role


@pytest.mark.django_db(transaction=True)
def test_every_websocket_subscription_against_every_role(users, datacenter):
    from tests.consumers.test_live import connect, db, make_run

    run = db(make_run)
    run = async_to_sync(run)(users, datacenter)
    streams = {
        ("run", run.pk): {"alice", "erin", "dave", "carol"},
        ("request", run.request_id): {"alice", "erin", "dave", "carol"},
        ("approvals", None): {"erin", "carol"},
        ("my-requests", None): EVERYONE,
    }

    async def check():
        for role in ROLES:
            comm, connected, _ = await connect(None if role == "anonymous" else users[role])
            if role == "anonymous":
                assert not connected
                continue
            for (stream, obj_id), allowed in streams.items():
                await comm.send_json_to({"action": "subscribe", "stream": stream, "id": obj_id, "after": 0})
                # The answer to this subscription; pushes and backlog of earlier ones are skipped.
                reply = await comm.receive_json_from(timeout=5)
                while reply["type"] not in ("subscribed", "error") or reply.get("stream") != stream:
                    reply = await comm.receive_json_from(timeout=5)
                got = reply["type"] == "subscribed"
                assert got == (role in allowed), (role, stream, reply)
            await comm.disconnect()

    async_to_sync(check)()
    assert MigrationRun.objects.filter(pk=run.pk).exists()
