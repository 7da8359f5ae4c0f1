"""Seed the demo: roles, users (alice, bob, carol, dave), the simulated datacenter, an inventory sync."""

from __future__ import annotations

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection
from migrations_app.services.inventory import inventory_sync

USERS = [
    # username, roles, teams, staff/superuser
    ("alice", [Role.REQUESTER], ["team-web", "team-data"], False),
    ("bob", [Role.APPROVER, Role.REQUESTER], ["team-ops"], False),
    ("carol", [Role.ADMIN], [], True),
    ("dave", [Role.AUDITOR], [], False),
]


class Command(BaseCommand):
    help = "Create demo users and the simulated datacenter (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--password", default="demo-pass-2026", help="Password for every demo user.")
        parser.add_argument("--speed", type=float, default=2.0, help="Simulator speed factor (1 = real time).")

    def handle(self, *args, password: str, speed: float, **options):
        for role in Role:
            Group.objects.get_or_create(name=role.value)
        for username, roles, teams, admin in USERS:
            user, _ = User.objects.get_or_create(username=username, defaults={"email": f"{username}@example.test"})
            user.set_password(password)
            user.is_staff = user.is_superuser = admin
            user.save()
            for name in [r.value for r in roles] + teams:
                user.groups.add(Group.objects.get_or_create(name=name)[0])
        conn, _ = HypervisorConnection.objects.update_or_create(
            name="Demo datacenter",
            defaults={"kind": "simulator", "options": {"speed": speed, "vms": 30, "clusters": 2,
                                                       "hosts_per_cluster": 3, "datastores": 3}},
        )
        counts = inventory_sync(connection=conn)
        self.stdout.write(self.style.SUCCESS(
            f"Simulated datacenter: {counts['vms']} VMs on {counts['hosts']} hosts, {counts['datastores']} datastores."
        ))
        self.stdout.write(f"Users (password for all: {password}):")
        for username, roles, teams, _ in USERS:
            self.stdout.write(f"  {username:<6} {', '.join(r.value for r in roles)}{' · ' + ', '.join(teams) if teams else ''}")
