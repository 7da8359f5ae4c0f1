"""The live websocket: authentication, Origin, per-subscription permission, ordered catch-up + push,
and clear errors for malformed messages."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from migrations_app.models import MigrationRun
from migrations_app.services import requests as svc
from migrations_app.services.runs import migration_run_execute
from portal.asgi import application
from tests.conftest import other_host_same_cluster, running_vm

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio, pytest.mark.usefixtures("review_everything")]


def db(fn):
    """Run ORM code from the async test in a worker thread that closes its connection afterwards
    (a connection left open would keep the test database from being dropped)."""

    def call(*args, **kwargs):
        from django.db import connection

        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return sync_to_async(call, thread_sensitive=False)


def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def connect(user=None, origin="http://localhost"):
    headers = [(b"host", b"localhost")]
    if origin:
        headers.append((b"origin", origin.encode()))
    if user is not None:
        cookie = await db(session_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    comm = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, code = await comm.connect()
    return comm, connected, code


def make_run(users, datacenter) -> MigrationRun:
    vm = running_vm(datacenter)
    mr = svc.migration_request_submit(requester=users["alice"], vm=vm, kind="compute",
                                      target_host=other_host_same_cluster(vm), reason="live test")
    svc.migration_request_approve(request=mr, actor=users["erin"])
    return MigrationRun.objects.get(request=mr)


async def test_anonymous_connection_is_refused():
    comm, connected, _ = await connect(None)
    assert not connected
    await comm.disconnect()


async def test_foreign_origin_is_refused(users):
    comm, connected, _ = await connect(users["alice"], origin="http://evil.example")
    assert not connected
    await comm.disconnect()


async def test_subscribing_to_someone_elses_run_is_refused(users, datacenter):
    run = await db(make_run)(users, datacenter)
    comm, connected, _ = await connect(users["mallory"])
    assert connected
    await comm.send_to(text_data=json.dumps({"action": "subscribe", "stream": "run", "id": run.pk, "after": 0}))
    reply = await comm.receive_json_from()
    assert reply["type"] == "error" and "may not watch" in reply["message"]
    # And nothing of that run reaches this socket afterwards.
    await db(migration_run_execute)(run_id=run.pk, worker="w")
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()


async def test_a_requester_cannot_watch_the_approval_queue(users):
    comm, connected, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "approvals"})
    reply = await comm.receive_json_from()
    assert reply["type"] == "error" and "approvers" in reply["message"]
    await comm.disconnect()


@pytest.mark.parametrize("raw, expected", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "unknown message"),
    ('{"action": "explode"}', "unknown message"),
    ('{"action": "subscribe", "stream": "nope"}', "unknown stream"),
    ('{"action": "subscribe", "stream": "run", "id": "1"}', "integer id"),
    ('{"action": "subscribe", "stream": "run", "id": 1, "after": -3}', "non-negative"),
    ("x" * 5000, "at most 4 KiB"),
])
async def test_malformed_messages_get_a_clear_error_and_the_socket_stays_usable(users, raw, expected):
    comm, connected, _ = await connect(users["alice"])
    await comm.send_to(text_data=raw)
    reply = await comm.receive_json_from()
    assert reply["type"] == "error" and expected in reply["message"]
    await comm.send_json_to({"action": "subscribe", "stream": "my-requests"})
    assert (await comm.receive_json_from())["type"] == "subscribed"
    await comm.disconnect()


async def test_progress_arrives_in_order_after_catching_up_from_stored_events(users, datacenter):
    run = await db(make_run)(users, datacenter)  # seq 1 (queued) is already stored
    comm, connected, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "run", "id": run.pk, "after": 0})
    assert (await comm.receive_json_from())["type"] == "subscribed"
    first = await comm.receive_json_from()
    assert (first["type"], first["seq"], first["status"]) == ("run.event", 1, "queued")

    await db(migration_run_execute)(run_id=run.pk, worker="w")
    seqs, percents, last = [1], [first["percent"]], first
    while last["status"] not in ("succeeded", "failed", "errored"):
        last = await comm.receive_json_from(timeout=5)
        if last["type"] != "run.event":
            continue
        seqs.append(last["seq"])
        percents.append(last["percent"])
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert percents == sorted(percents) and last["status"] == "succeeded" and last["percent"] == 100
    for key in ("type", "id", "seq", "status", "phase", "percent", "rate_bytes_per_s", "eta_s"):
        assert key in last
    await comm.disconnect()

    # A page that reconnects after seq N gets exactly the events after N.
    comm, _, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "run", "id": run.pk, "after": seqs[-3]})
    assert (await comm.receive_json_from())["type"] == "subscribed"
    again = [(await comm.receive_json_from())["seq"] for _ in range(2)]
    assert again == seqs[-2:]
    assert await comm.receive_nothing(timeout=0.2)
    await comm.disconnect()


async def test_the_requesters_list_hears_about_a_decision(users, datacenter):
    comm, _, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "my-requests"})
    assert (await comm.receive_json_from())["type"] == "subscribed"
    run = await db(make_run)(users, datacenter)
    statuses = set()
    while "queued" not in statuses:
        msg = await comm.receive_json_from(timeout=5)
        assert msg["type"] == "request.changed" and msg["id"] == run.request_id
        statuses.add(msg["status"])
    await comm.disconnect()


async def test_a_request_subscription_reports_the_current_status(users, datacenter):
    run = await db(make_run)(users, datacenter)
    comm, _, _ = await connect(users["alice"])
    await comm.send_json_to({"action": "subscribe", "stream": "request", "id": run.request_id})
    reply = await comm.receive_json_from()
    assert reply == {"type": "subscribed", "stream": "request", "id": run.request_id, "status": "queued",
                     "approvals": 1}  # one approver signed its one stage
    await comm.disconnect()
    comm, _, _ = await connect(users["mallory"])
    await comm.send_json_to({"action": "subscribe", "stream": "request", "id": run.request_id})
    assert (await comm.receive_json_from())["type"] == "error"
    await comm.disconnect()


async def test_a_user_who_loses_the_right_stops_receiving_and_it_is_audited(users, datacenter, monkeypatch):
    from migrations_app import consumers
    from migrations_app.models import AuditEntry

    monkeypatch.setattr(consumers, "RECHECK_S", 0.0)  # re-check on every relayed event
    run = await db(make_run)(users, datacenter)
    comm, _, _ = await connect(users["erin"])  # an approver may watch alice's run
    await comm.send_json_to({"action": "subscribe", "stream": "run", "id": run.pk, "after": 99})
    assert (await comm.receive_json_from())["type"] == "subscribed"

    def demote():
        users["erin"].groups.clear()

    await db(demote)()
    await db(migration_run_execute)(run_id=run.pk, worker="w")
    reply = await comm.receive_json_from(timeout=5)
    assert reply == {"type": "error", "message": "you may no longer watch this", "stream": "run", "id": run.pk}
    assert await comm.receive_nothing(timeout=0.3)  # and nothing more of that run
    await comm.disconnect()

    def denied():
        return AuditEntry.objects.filter(actor=users["erin"], outcome="denied", object_type="stream:run").count()

    assert await db(denied)() == 1
