"""A stage signature leaves the request pending but still reaches the requester's page: the push
and the subscription answer carry the number of signatures."""

from __future__ import annotations

import pytest

from migrations_app.services import requests as svc
from tests.conftest import install_policy, other_host_same_cluster, running_vm
from tests.consumers.test_live import connect, db

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

TWO_REVIEWS = {"name": "Two reviews", "rules": [{"name": "all", "when": {}, "action": "stages", "stages": [
    {"name": "First", "groups": ["approver"], "mode": "any"}, {"name": "Second", "groups": ["approver"]}]}]}


def submit(users, datacenter):
    install_policy(TWO_REVIEWS)
    vm = running_vm(datacenter)
    return svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                        target_host=other_host_same_cluster(vm), reason="two reviews")


async def test_a_stage_signature_is_pushed_to_the_requesters_page(users, datacenter):
    mr = await db(submit)(users, datacenter)
    comm, _, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "request", "id": mr.pk})
    assert await comm.receive_json_from() == {"type": "subscribed", "stream": "request", "id": mr.pk,
                                              "status": "pending_approval", "approvals": 0}
    await db(svc.migration_request_approve)(request=mr, actor=users["erin"])
    pushed = await comm.receive_json_from(timeout=5)
    assert (pushed["type"], pushed["status"], pushed["approvals"]) == ("request.changed", "pending_approval", 1)
    await db(svc.migration_request_approve)(request=mr, actor=users["bob"])
    pushed = await comm.receive_json_from(timeout=5)
    assert (pushed["status"], pushed["approvals"]) == ("queued", 2)
    await comm.disconnect()
