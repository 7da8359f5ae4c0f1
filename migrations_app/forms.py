"""Forms: parse and validate input at the boundary. The services decide whether a move is valid."""

from __future__ import annotations

from django import forms
from django.core.validators import MaxValueValidator

from migrations_app.choices import MigrationKind, NotificationCategory, PlanKind
from migrations_app.models import Cluster, Datastore, Host, VirtualMachine
from migrations_app.services.api_tokens import expiry_limits
from migrations_app.services.requests import MAX_BATCH

DATETIME_INPUTS = ["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S"]


class _MoveForm(forms.Form):
    """What the Migrate pages ask: the kind, the targets, the reason and the window. A window
    needs both ends; whether it is acceptable (in the future, long enough, not too far ahead) is
    the service's call (``migrations_app.windows.window_problem``)."""

    kind = forms.ChoiceField(choices=MigrationKind.choices, widget=forms.RadioSelect, initial=MigrationKind.COMPUTE)
    target_host = forms.ModelChoiceField(queryset=Host.objects.none(), required=False)
    target_datastore = forms.ModelChoiceField(queryset=Datastore.objects.none(), required=False)
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=2000, strip=True)
    start_mode = forms.ChoiceField(choices=[("now", "As soon as approved"), ("window", "In a change window (UTC)")],
                                   initial="now", widget=forms.RadioSelect)
    start_after = forms.DateTimeField(required=False, label="Window start",
                                      widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                      input_formats=DATETIME_INPUTS)
    window_end = forms.DateTimeField(required=False, label="Window end",
                                     widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                     input_formats=DATETIME_INPUTS)

    def limit_targets(self, connection_ids) -> None:
        # Any host or datastore of the VMs' own connections parses; the service judges validity.
        self.fields["target_host"].queryset = Host.objects.filter(connection_id__in=connection_ids).select_related(
            "cluster")
        self.fields["target_datastore"].queryset = Datastore.objects.filter(connection_id__in=connection_ids)

    def clean(self):
        data = super().clean()
        kind = data.get("kind")
        if kind == MigrationKind.STORAGE:
            data["target_host"] = None
        if kind == MigrationKind.COMPUTE:
            data["target_datastore"] = None
        if data.get("start_mode") == "window":
            for name in ("start_after", "window_end"):
                if data.get(name) is None and name not in self.errors:
                    self.add_error(name, "give both ends of the window, or choose 'As soon as approved'")
        else:
            data["start_after"] = data["window_end"] = None
        return data


class MigrateForm(_MoveForm):
    """The Migrate page of one VM."""

    def __init__(self, *args, vm, **kwargs):
        super().__init__(*args, **kwargs)
        self.vm = vm
        self.limit_targets([vm.connection_id])


class MigrateManyForm(_MoveForm):
    """The Migrate page of several VMs selected in the inventory: one target, one reason and one
    window for all of them (one request per VM). ``vms`` are those this user may see."""

    vms = forms.ModelMultipleChoiceField(queryset=VirtualMachine.objects.none(), widget=forms.MultipleHiddenInput,
                                         error_messages={"required": "select at least one VM in the inventory"})

    def __init__(self, *args, vms, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["vms"].queryset = vms
        self.limit_targets(vms.values_list("connection_id", flat=True).distinct())

    def clean_vms(self):
        vms = self.cleaned_data["vms"]
        if len(vms) > MAX_BATCH:
            raise forms.ValidationError(f"at most {MAX_BATCH} VMs at once")
        return vms


class RejectForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000, strip=True,
                             error_messages={"required": "a rejection needs a reason the requester can act on"})


class CommentForm(forms.Form):
    comment = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000, required=False, strip=True)


class AuditFilterForm(forms.Form):
    actor = forms.CharField(required=False)
    vm = forms.CharField(required=False, label="VM")
    action = forms.CharField(required=False)
    outcome = forms.CharField(required=False)
    request = forms.CharField(required=False, label="Request #")
    since = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d"])
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
                                input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d"])
    q = forms.CharField(required=False, label="Text")


class NotificationPreferencesForm(forms.Form):
    """One checkbox per category: checked means "mail me"."""

    wanted = forms.MultipleChoiceField(choices=NotificationCategory.choices, required=False,
                                       widget=forms.CheckboxSelectMultiple, label="Mail me when")


class PlanBuildForm(forms.Form):
    """What to evacuate or rebalance; the service decides whether a plan can be built."""

    kind = forms.ChoiceField(choices=PlanKind.choices)
    host = forms.ModelChoiceField(queryset=Host.objects.filter(present=True), required=False)
    datastore = forms.ModelChoiceField(queryset=Datastore.objects.filter(present=True), required=False)
    cluster = forms.ModelChoiceField(queryset=Cluster.objects.all(), required=False)
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), max_length=2000, strip=True)


class ApiTokenForm(forms.Form):
    """A new personal API token: what it is for, and for how many days it works (the default and
    the longest come from PORTAL["API_TOKEN_DEFAULT_DAYS"] and ["API_TOKEN_MAX_DAYS"])."""

    name = forms.CharField(max_length=100, strip=True, help_text="What it is for: an AWX credential, a CI job.")
    days = forms.IntegerField(min_value=1, label="Expires in (days)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        default, longest = expiry_limits()
        self.fields["days"].initial = default
        self.fields["days"].max_value = longest
        self.fields["days"].validators.append(MaxValueValidator(longest))
        self.fields["days"].widget.attrs["max"] = longest
        self.fields["days"].help_text = f"At most {longest} days."
