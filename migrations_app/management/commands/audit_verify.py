"""Verify the audit log's hash chain and its signed checkpoints; name the first bad entry.

Exit status 0 when the log verifies, 1 when it does not (for monitoring and cron).
"""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from migrations_app.services.audit import audit_checkpoint, audit_verify_chain


class Command(BaseCommand):
    help = "Check the audit log's hash chain and signed checkpoints."

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", action="store_true", help="Sign the current tail afterwards.")

    def handle(self, *args, checkpoint: bool, **options):
        verdict = audit_verify_chain()
        if not verdict.ok:
            self.stderr.write(self.style.ERROR(f"audit log does NOT verify: {verdict.problem}"))
            sys.exit(1)
        self.stdout.write(self.style.SUCCESS(f"audit log verifies: {verdict.checked} entries"))
        if checkpoint and (cp := audit_checkpoint()) is not None:
            self.stdout.write(f"checkpoint signed at entry {cp.entry_id}")
