"""Seed the demo: roles, users (alice, bob, erin, carol, dave), the simulated datacenter, an inventory
sync, the shipped approval policy, and (once) three requests by alice that show its three outcomes."""

from __future__ import annotations

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.policy.defaults import SMALL_DISK_GIB, SMALL_MEMORY_GIB
from migrations_app.selectors import datastore_choices, host_choices
from migrations_app.services.errors import ActionRefused
from migrations_app.services.inventory import inventory_sync
from migrations_app.services.policies import install_default_policy
from migrations_app.services.requests import migration_request_submit

GiB = 1024**3

USERS = [
    # username, roles, teams, staff/superuser
    ("alice", [Role.REQUESTER], ["team-web", "team-data"], False),
    ("bob", [Role.APPROVER, Role.REQUESTER], ["team-ops"], False),
    # A second approver: production VMs need two distinct approvers (bob and erin).
    ("erin", [Role.APPROVER], [], False),
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
        install_default_policy()
        if not MigrationRequest.objects.exists():
            self._show_policy_outcomes(conn)
        self.stdout.write(f"Users (password for all: {password}):")
        for username, roles, teams, _ in USERS:
            self.stdout.write(f"  {username:<6} {', '.join(r.value for r in roles)}{' · ' + ', '.join(teams) if teams else ''}")

    def _show_policy_outcomes(self, conn) -> None:
        """Alice asks for three moves, one per outcome of the shipped policy: a small compute move
        (approved automatically), a storage move (one approver), a production VM (two approvers)."""
        alice = User.objects.get(username="alice")
        vms = list(VirtualMachine.objects.filter(connection=conn, power_state="on", owner_group__name="team-web")
                   .exclude(tags__icontains="sim:").order_by("name"))

        def small(vm):
            return vm.memory_bytes <= SMALL_MEMORY_GIB * GiB and vm.disk_bytes <= SMALL_DISK_GIB * GiB

        production = [vm for vm in vms if "env:production" in vm.tags]
        other = [vm for vm in vms if "env:production" not in vm.tags]
        picks = [
            ("compute", next((vm for vm in other if small(vm)), None), "demo: small compute move (auto-approved)"),
            ("storage", next((vm for vm in other if not small(vm)), other[-1] if other else None),
             "demo: storage move (needs one approver)"),
            ("compute", production[0] if production else None, "demo: production VM (needs two approvers)"),
        ]
        used = set()
        for kind, vm, reason in picks:
            if vm is None or vm.pk in used:
                self.stdout.write(f"  (no suitable VM for: {reason})")
                continue
            used.add(vm.pk)
            host = next((c.obj for c in host_choices(vm) if c.valid), None) if kind == "compute" else None
            ds = next((c.obj for c in datastore_choices(vm, None) if c.valid), None) if kind == "storage" else None
            try:
                mr = migration_request_submit(requester=alice, vm=vm, kind=kind, reason=reason, target_host=host,
                                              target_datastore=ds)
            except ActionRefused as exc:
                self.stdout.write(f"  (skipped {reason}: {exc.message})")
                continue
            self.stdout.write(f"  request #{mr.pk} {vm.name}: {mr.get_status_display().lower()} ({mr.policy_note})")
