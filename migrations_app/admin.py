"""Django admin: configuration (connections, inventory) and read-only views of requests and audit.

State changes go through services: the admin offers "Sync inventory now" as an action and shows
requests, runs and the audit log read-only.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.db.models import F
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import path

from drivers.base import DriverError
from migrations_app.choices import NotificationCategory
from migrations_app.models import (
    ApiToken,
    ApprovalPolicy,
    AuditEntry,
    Cluster,
    Datacenter,
    Datastore,
    Host,
    HypervisorConnection,
    MigrationRequest,
    MigrationRun,
    Network,
    NotificationDelivery,
    PolicyRule,
    PolicyStage,
    VirtualMachine,
    Webhook,
)
from migrations_app.policy.document import PolicyDocumentError, dumps, loads
from migrations_app.services.api_tokens import api_token_revoke
from migrations_app.services.audit import audit_config_change, config_delete, snapshot
from migrations_app.services.errors import ActionRefused
from migrations_app.services.inventory import driver_for, inventory_sync
from migrations_app.services.policies import approval_policy_activate, approval_policy_export, approval_policy_import


class HypervisorConnectionForm(forms.ModelForm):
    password = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False),
        help_text="Encrypted at rest. Leave blank to keep the current password.",
    )

    class Meta:
        model = HypervisorConnection
        fields = ["name", "kind", "url", "username", "password", "verify_tls", "ca_bundle", "is_lab", "options",
                  "enabled"]


class AuditedAdmin(admin.ModelAdmin):
    """Every add, change and delete made in the admin lands in the audit log, in the admin's own
    transaction (Django wraps each change form in one), after the many-to-many fields are saved."""

    audit_fields: tuple[str, ...] = ()

    def save_model(self, request, obj, form, change):
        request._audit_before = snapshot(type(obj).objects.get(pk=obj.pk), self.audit_fields) if change else {}
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        audit_config_change(actor=request.user, obj=form.instance, before=getattr(request, "_audit_before", {}),
                            fields=self.audit_fields, ip=request.META.get("REMOTE_ADDR"))

    def delete_model(self, request, obj):
        config_delete(actor=request.user, obj=obj, fields=self.audit_fields, ip=request.META.get("REMOTE_ADDR"))

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(HypervisorConnection)
class HypervisorConnectionAdmin(AuditedAdmin):
    audit_fields = HypervisorConnection.AUDITED_FIELDS
    list_display = ("name", "kind", "url", "enabled", "last_sync_at", "last_sync_error")
    actions = ["test_connection", "sync_now"]

    form = HypervisorConnectionForm

    def save_model(self, request, obj, form, change):
        # A blank password field keeps the stored one; the stored one is never sent to the page.
        if form.cleaned_data.get("password"):
            obj.set_password(form.cleaned_data["password"])
        super().save_model(request, obj, form, change)

    @admin.action(description="Test the connection")
    def test_connection(self, request, queryset):
        for conn in queryset:
            try:
                messages.success(request, f"{conn.name}: {driver_for(conn).check_connection()}")
            except DriverError as exc:
                messages.error(request, f"{conn.name}: {exc.explanation()}")

    @admin.action(description="Sync inventory now")
    def sync_now(self, request, queryset):
        for conn in queryset:
            try:
                counts = inventory_sync(connection=conn, actor=request.user)
                messages.success(request, f"{conn.name}: {counts['vms']} VMs, {counts['hosts']} hosts synced")
            except DriverError as exc:
                messages.error(request, f"{conn.name}: {exc.explanation()}")


class WebhookForm(forms.ModelForm):
    secret = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False),
        help_text="Signs every delivery (HMAC-SHA256); encrypted at rest. Leave blank to keep the current secret.",
    )
    categories = forms.MultipleChoiceField(choices=NotificationCategory.choices, required=False,
                                           widget=forms.CheckboxSelectMultiple, help_text="None ticked: every category.")

    class Meta:
        model = Webhook
        fields = ["name", "url", "secret", "categories", "active"]

    def clean(self):
        data = super().clean()
        if not data.get("secret") and not (self.instance.pk and self.instance.secret_encrypted):
            self.add_error("secret", "a new webhook needs a secret to sign its deliveries")
        return data


@admin.register(Webhook)
class WebhookAdmin(AuditedAdmin):
    """Chat and ITSM endpoints; changes are audited with the secret redacted."""

    audit_fields = Webhook.AUDITED_FIELDS
    form = WebhookForm
    list_display = ("name", "url", "active", "categories")

    def save_model(self, request, obj, form, change):
        if form.cleaned_data.get("secret"):
            obj.set_secret(form.cleaned_data["secret"])
        super().save_model(request, obj, form, change)


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(ReadOnlyAdmin):
    list_display = ("id", "created_at", "category", "channel", "address", "status", "attempts", "last_error")
    list_filter = ("status", "channel", "category")
    search_fields = ("address", "subject")


@admin.register(VirtualMachine)
class VirtualMachineAdmin(ReadOnlyAdmin):
    list_display = ("name", "host", "power_state", "memory_bytes", "owner_group", "present")
    list_filter = ("connection", "power_state", "present")
    search_fields = ("name", "ref")


@admin.register(Host)
class HostAdmin(ReadOnlyAdmin):
    list_display = ("name", "cluster", "connected", "maintenance", "present")
    list_filter = ("connection", "cluster")


@admin.register(Datastore)
class DatastoreAdmin(ReadOnlyAdmin):
    list_display = ("name", "connection", "capacity_bytes", "free_bytes", "accessible", "present")


admin.site.register([Datacenter, Cluster, Network], ReadOnlyAdmin)


@admin.register(MigrationRequest)
class MigrationRequestAdmin(ReadOnlyAdmin):
    list_display = ("id", "vm", "kind", "status", "requester", "created_at")
    list_filter = ("status", "kind")


@admin.register(MigrationRun)
class MigrationRunAdmin(ReadOnlyAdmin):
    list_display = ("id", "request", "phase", "percent", "task_id", "worker", "heartbeat_at", "handed_at", "requeues",
                    "finished_at")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("id", "created_at", "actor_name", "action", "outcome", "vm_name", "ip")
    list_filter = ("action", "outcome")
    search_fields = ("actor_name", "vm_name", "reason")


@admin.register(ApiToken)
class ApiTokenAdmin(ReadOnlyAdmin):
    """Every user's personal API tokens: who has which, until when, last used when and from where.
    Users make their own on the API tokens page; here admins revoke any (the service checks the
    admin role and audits it). Tokens are revoked, never deleted."""

    list_display = ("id", "name", "user", "hint", "created_at", "expires_at", "last_used_at", "last_used_ip",
                    "revoked_at", "revoked_by")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "last4")
    list_select_related = ("user", "revoked_by")
    fields = readonly_fields = ("user", "name", "hint", "created_at", "expires_at", "last_used_at", "last_used_ip",
                                "revoked_at", "revoked_by")
    actions = ["revoke"]

    @admin.action(description="Revoke the selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            try:
                api_token_revoke(token=token, actor=request.user, ip=request.META.get("REMOTE_ADDR"))
            except ActionRefused as exc:
                messages.error(request, f"{token}: {exc.message}")
            else:
                messages.success(request, f"{token}: revoked")


# -- approval policies -------------------------------------------------------------------------


class PolicyRuleInline(admin.TabularInline):
    model = PolicyRule
    extra = 0
    fields = ("order", "name", "conditions", "action", "reject_reason")
    show_change_link = True  # the rule's own page edits its stages


class PolicyStageInline(admin.TabularInline):
    model = PolicyStage
    extra = 0
    fields = ("order", "name", "groups", "mode", "count")


class PolicyImportForm(forms.Form):
    file = forms.FileField(help_text="A policy document, .yaml/.yml or .json (as exported).")
    activate = forms.BooleanField(required=False, help_text="Make it the active policy.")


@admin.register(ApprovalPolicy)
class ApprovalPolicyAdmin(AuditedAdmin):
    """Rules inline (each rule's page edits its stages); import, export and activation go through
    the policy services. Every change raises the policy's version; requests in flight keep the
    stages frozen at their submission."""

    audit_fields = ApprovalPolicy.AUDITED_FIELDS
    list_display = ("name", "active", "version", "updated_at")
    fields = ("name", "description", "active", "version")
    # Activation goes through the "activate" action (the policy service: exactly one active policy,
    # audited as a policy activation), never by ticking the box on one policy's form.
    readonly_fields = ("active", "version")
    inlines = [PolicyRuleInline]
    actions = ["activate", "export_yaml", "export_json"]
    change_list_template = "admin/migrations_app/approvalpolicy/change_list.html"

    def save_model(self, request, obj, form, change):
        if change:
            obj.version = F("version") + 1
        super().save_model(request, obj, form, change)
        obj.refresh_from_db(fields=["version"])

    def get_urls(self):
        return [path("import/", self.admin_site.admin_view(self.import_view), name="approvalpolicy_import"),
                *super().get_urls()]

    def import_view(self, request):
        """Upload a YAML or JSON document; every error is listed with its path, and nothing changes."""
        if not self.has_add_permission(request):
            return redirect("admin:index")
        form = PolicyImportForm(request.POST or None, request.FILES or None)
        errors: list[str] = []
        if request.method == "POST" and form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                text = upload.read().decode("utf-8")
                policy = approval_policy_import(actor=request.user, document=loads(text, upload.name),
                                                activate=form.cleaned_data["activate"],
                                                ip=request.META.get("REMOTE_ADDR"))
            except UnicodeDecodeError:
                errors = ["(document): not UTF-8 text"]
            except PolicyDocumentError as exc:
                errors = exc.errors
            else:
                messages.success(request, f"Imported {policy.name} v{policy.version}"
                                          f"{' (active)' if policy.active else ''}.")
                return redirect("admin:migrations_app_approvalpolicy_changelist")
        return render(request, "admin/migrations_app/approvalpolicy/import.html", {
            **self.admin_site.each_context(request), "form": form, "errors": errors, "opts": self.model._meta,
            "title": "Import an approval policy",
        })

    @admin.action(description="Activate (the one active policy)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            messages.error(request, "Choose exactly one policy to activate.")
            return
        policy = approval_policy_activate(actor=request.user, policy=queryset.get(),
                                          ip=request.META.get("REMOTE_ADDR"))
        messages.success(request, f"{policy.name} is now the active policy.")

    def _export(self, request, queryset, suffix: str):
        if queryset.count() != 1:
            messages.error(request, "Choose exactly one policy to export.")
            return None
        policy = queryset.get()
        filename = f"{policy.name.lower().replace(' ', '-')}.{suffix}"
        response = HttpResponse(dumps(approval_policy_export(policy=policy), filename),
                                content_type="application/json" if suffix == "json" else "application/yaml")
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response

    @admin.action(description="Export as YAML")
    def export_yaml(self, request, queryset):
        return self._export(request, queryset, "yaml")

    @admin.action(description="Export as JSON")
    def export_json(self, request, queryset):
        return self._export(request, queryset, "json")


@admin.register(PolicyRule)
class PolicyRuleAdmin(AuditedAdmin):
    audit_fields = ("policy", "order", "name", "conditions", "action", "reject_reason", "summary")
    list_display = ("policy", "order", "name", "action")
    list_filter = ("policy",)
    inlines = [PolicyStageInline]

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        ApprovalPolicy.objects.filter(pk=form.instance.policy_id).update(version=F("version") + 1)


# Roles are groups: who may approve or audit is configuration, and changes to it are audited too.
admin.site.unregister(User)
admin.site.unregister(Group)


@admin.register(User)
class AuditedUserAdmin(AuditedAdmin, UserAdmin):
    audit_fields = ("username", "email", "is_active", "is_staff", "is_superuser", "groups", "password")


@admin.register(Group)
class AuditedGroupAdmin(AuditedAdmin, GroupAdmin):
    audit_fields = ("name", "permissions")
