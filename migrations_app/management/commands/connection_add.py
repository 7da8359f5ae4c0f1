"""Add (or update) a hypervisor connection from the command line, then sync its inventory.

    manage.py connection_add --name kvm-lab --kind libvirt --lab --options "$LAB_KVM_DRIVER_OPTIONS"
    manage.py connection_add --name vcsim --kind vcenter --url https://127.0.0.1:PORT/sdk \\
        --username user --password-env VCENTER_PASSWORD --ca-bundle lab/run/vcsim/cert.pem

The password is read from an environment variable, never from the command line (it would show
in the process list and the shell history).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from drivers.base import DriverError
from migrations_app.choices import ConnectionKind
from migrations_app.models import HypervisorConnection
from migrations_app.services.audit import audit_config_change, snapshot
from migrations_app.services.inventory import inventory_sync


class Command(BaseCommand):
    help = "Add or update a hypervisor connection and sync its inventory."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--kind", required=True, choices=ConnectionKind.values)
        parser.add_argument("--url", default="")
        parser.add_argument("--username", default="")
        parser.add_argument("--password-env", default="", help="Name of the environment variable holding it.")
        parser.add_argument("--ca-bundle", default="", help="Path of a PEM file to trust for this endpoint.")
        parser.add_argument("--lab", action="store_true", help="A lab endpoint (plain http allowed).")
        parser.add_argument("--options", default="{}", help="Driver options as a JSON object.")

    def handle(self, *args, **o):
        try:
            options = json.loads(o["options"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--options is not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise CommandError("--options must be a JSON object")
        if o["password_env"] and o["password_env"] not in os.environ:
            raise CommandError(f"environment variable {o['password_env']} is not set")
        fields = HypervisorConnection.AUDITED_FIELDS
        with transaction.atomic():  # the change and its audit entry together, as in the admin
            conn = HypervisorConnection.objects.select_for_update().filter(name=o["name"]).first()
            before = snapshot(conn, fields) if conn else {}
            conn = conn or HypervisorConnection(name=o["name"])
            conn.kind, conn.url, conn.username, conn.is_lab, conn.options = (
                o["kind"], o["url"], o["username"], o["lab"], options)
            if o["ca_bundle"]:
                conn.ca_bundle = Path(o["ca_bundle"]).read_text()
            if o["password_env"]:
                conn.set_password(os.environ[o["password_env"]])
            conn.save()
            audit_config_change(actor=None, obj=conn, before=before, fields=fields)
        try:
            counts = inventory_sync(connection=conn)
        except DriverError as exc:
            raise CommandError(f"{conn.name} saved, but its inventory sync failed: {exc.explanation()}") from None
        self.stdout.write(self.style.SUCCESS(
            f"{conn.name}: {counts['vms']} VMs on {counts['hosts']} hosts, {counts['datastores']} datastores"))
