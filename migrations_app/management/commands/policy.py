"""Export or import approval policies as YAML or JSON (by the file's extension).

    manage.py policy export FILE [--name NAME]     # default: the active policy
    manage.py policy import FILE [--activate]      # every error with its path; a bad file changes nothing
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from migrations_app.models import ApprovalPolicy
from migrations_app.policy.document import PolicyDocumentError, dumps, loads
from migrations_app.services.policies import approval_policy_export, approval_policy_import


class Command(BaseCommand):
    help = "Export or import an approval policy (YAML or JSON, chosen by the file's extension)."

    def add_arguments(self, parser):
        parser.add_argument("verb", choices=["export", "import"])
        parser.add_argument("file", help="path ending in .yaml, .yml or .json; '-' exports to stdout as YAML")
        parser.add_argument("--name", help="export: the policy of this name (default: the active one)")
        parser.add_argument("--activate", action="store_true", help="import: make it the active policy")

    def handle(self, *args, verb: str, file: str, name: str | None, activate: bool, **options):
        if verb == "export":
            policy = (ApprovalPolicy.objects.filter(name=name) if name else ApprovalPolicy.objects.filter(active=True)).first()
            if policy is None:
                raise CommandError(f"no policy named {name!r}" if name else "no active policy")
            try:
                text = dumps(approval_policy_export(policy=policy), "stdout.yaml" if file == "-" else file)
            except PolicyDocumentError as exc:
                raise CommandError("; ".join(exc.errors)) from None
            if file == "-":
                self.stdout.write(text, ending="")
            else:
                Path(file).write_text(text, encoding="utf-8")
                self.stdout.write(self.style.SUCCESS(f"Exported {policy.name} v{policy.version} to {file}"))
            return
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from None
        try:
            policy = approval_policy_import(actor=None, document=loads(text, file), activate=activate)
        except PolicyDocumentError as exc:
            for error in exc.errors:
                self.stderr.write(error)
            raise CommandError(f"{file}: {len(exc.errors)} error(s); nothing was changed") from None
        self.stdout.write(self.style.SUCCESS(
            f"Imported {policy.name} v{policy.version}{' (active)' if policy.active else ''}"))
