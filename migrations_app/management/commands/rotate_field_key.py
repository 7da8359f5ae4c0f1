"""Re-encrypt every stored secret (hypervisor passwords, webhook secrets) under a new key, then
make that key current.

    manage.py rotate_field_key                 # new random key, written to var/field.key
    NEW_KEY=... manage.py rotate_field_key --new-key-env NEW_KEY   # a key you generated

All passwords are re-encrypted in one transaction with its audit entry: either every one moves to
the new key or none does. With PORTAL_FIELD_KEY in the environment, set it to the new key
(printed once) and restart the portal.
"""

from __future__ import annotations

import os

from cryptography.fernet import Fernet
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from migrations_app.choices import AuditAction
from migrations_app.models import HypervisorConnection, Webhook
from migrations_app.secrets import decrypt, install_key, rotate_token
from migrations_app.services.audit import audit_record


class Command(BaseCommand):
    help = "Re-encrypt hypervisor credentials under a new key."

    def add_arguments(self, parser):
        parser.add_argument("--new-key-env", default="", help="Environment variable holding the new Fernet key.")

    def handle(self, *args, new_key_env: str, **options):
        new_key = os.environ.get(new_key_env, "").encode() if new_key_env else Fernet.generate_key()
        try:
            Fernet(new_key)
        except ValueError:
            raise CommandError("the new key is not a valid Fernet key (32 url-safe base64 bytes)") from None
        with transaction.atomic():
            conns = list(HypervisorConnection.objects.select_for_update().exclude(password_encrypted=""))
            for conn in conns:
                decrypt(conn.password_encrypted)  # fails loudly now, not after half the rows moved
                conn.password_encrypted = rotate_token(conn.password_encrypted, new_key)
                conn.save(update_fields=["password_encrypted"])
            hooks = list(Webhook.objects.select_for_update().exclude(secret_encrypted=""))
            for hook in hooks:
                decrypt(hook.secret_encrypted)
                hook.secret_encrypted = rotate_token(hook.secret_encrypted, new_key)
                hook.save(update_fields=["secret_encrypted"])
            audit_record(actor=None, action=AuditAction.KEY_ROTATED, object_type="field_key",
                         reason=f"{len(conns)} connection password(s) and {len(hooks)} webhook secret(s) re-encrypted")
            written = install_key(new_key)
        if written:
            self.stdout.write(self.style.SUCCESS(f"{len(conns)} password(s) re-encrypted; new key in var/field.key"))
        else:
            self.stdout.write(self.style.WARNING(
                f"{len(conns)} password(s) re-encrypted. Set PORTAL_FIELD_KEY to the new key and restart:"))
            self.stdout.write(new_key.decode())
