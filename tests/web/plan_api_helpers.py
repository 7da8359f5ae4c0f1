"""What the move-plan API tests share: users' clients, JSON posts, plans built and submitted
through the services on a small simulated evacuation (``tests.simdc``), and test policies."""

from __future__ import annotations

import json

from django.test import Client

from migrations_app.choices import AuditOutcome, PlanKind
from migrations_app.models import AuditEntry, Host, MovePlan
from migrations_app.services import plans as svc
from tests.conftest import client_for

ROLES = ("anonymous", "alice", "mallory", "erin", "dave", "carol")  # owner, stranger, approver, auditor, admin
SEE_PLANS = {"erin", "dave", "carol"}

TWO_STAGES = {"name": "Two stages (tests)", "description": "", "rules": [
    {"name": "Every move needs two stages", "when": {}, "action": "stages",
     "stages": [{"name": "Ops", "groups": ["approver"], "mode": "any"},
                {"name": "Change board", "groups": ["approver"], "mode": "any"}]}]}
AUTO = {"name": "Approve everything (tests)", "description": "", "rules": [
    {"name": "Every move goes", "when": {}, "action": "auto_approve"}]}
TWO_DISTINCT = {"name": "Two distinct (tests)", "description": "", "rules": [
    {"name": "Every move needs two people", "when": {}, "action": "stages",
     "stages": [{"name": "Pair", "groups": ["approver"], "mode": "n_distinct", "count": 2}]}]}


def client(users, role) -> Client:
    return Client() if role == "anonymous" else client_for(users[role])


def post(c: Client, url: str, payload=None, *, raw: str | None = None):
    body = raw if raw is not None else json.dumps({} if payload is None else payload)
    return c.post(url, data=body, content_type="application/json")


def src_host(conn) -> Host:
    return Host.objects.get(connection=conn, name="src.lab")


def built(conn, users, who="carol") -> MovePlan:
    return svc.move_plan_build(requester=users[who], kind=PlanKind.EVACUATE_HOST, host=src_host(conn), reason="bios")


def submitted(conn, users) -> MovePlan:
    return svc.move_plan_submit(plan=built(conn, users), actor=users["carol"])


def status_of(plan) -> str:
    return MovePlan.objects.get(pk=plan.pk).status


def denied(action=None) -> int:
    entries = AuditEntry.objects.filter(outcome=AuditOutcome.DENIED)
    return (entries.filter(action=action) if action else entries).count()

