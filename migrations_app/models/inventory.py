"""Inventory mirrored from the hypervisor managers: connection -> datacenter -> cluster -> host,
datastores (and which hosts see them), networks, VMs and their disks.

Rows are written only by ``services.inventory`` (sync) and ``services.runs`` (placement after a
move); ``ref`` is the driver's opaque identifier, unique within one connection.
"""

from __future__ import annotations

from django.contrib.auth.models import Group
from django.db import models

from migrations_app.choices import ConnectionKind, PowerState


class HypervisorConnection(models.Model):
    """One hypervisor manager the portal talks to: a vCenter, a set of libvirt hosts, the simulator."""

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=ConnectionKind.choices)
    url = models.CharField(max_length=500, blank=True)
    username = models.CharField(max_length=200, blank=True)
    password_encrypted = models.TextField(blank=True, editable=False, help_text="Fernet token; see secrets.py.")
    verify_tls = models.BooleanField(default=True)
    ca_bundle = models.TextField(blank=True, help_text="PEM certificates trusted for this endpoint.")
    is_lab = models.BooleanField(default=False, help_text="Lab endpoint: plain HTTP / unverified TLS allowed.")
    options = models.JSONField(default=dict, blank=True, help_text="Driver-specific settings.")
    enabled = models.BooleanField(default=True)
    last_sync_at = models.DateTimeField(null=True, blank=True)
    last_sync_error = models.TextField(blank=True)

    # What an audit entry records of a change to a connection (the password only as set/empty).
    AUDITED_FIELDS = ("name", "kind", "url", "username", "password_encrypted", "verify_tls", "ca_bundle", "is_lab",
                      "options", "enabled")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def supports(self, capability) -> bool:
        """Whether this connection's driver declares a ``drivers.base.Capability``."""
        from drivers.registry import driver_class

        return capability in driver_class(self.kind).capabilities

    def set_password(self, plain: str) -> None:
        from migrations_app.secrets import encrypt

        self.password_encrypted = encrypt(plain)

    def get_password(self) -> str:
        from migrations_app.secrets import decrypt

        return decrypt(self.password_encrypted)


class Datacenter(models.Model):
    """A datacenter of one connection."""

    connection = models.ForeignKey(HypervisorConnection, on_delete=models.CASCADE, related_name="datacenters")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200)

    class Meta:
        unique_together = [("connection", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Cluster(models.Model):
    """A set of hosts between which a running VM may move (vCenter cluster, libvirt host group)."""

    datacenter = models.ForeignKey(Datacenter, on_delete=models.CASCADE, related_name="clusters")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200)

    class Meta:
        unique_together = [("datacenter", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Host(models.Model):
    """A hypervisor host (ESXi, a libvirt daemon)."""

    connection = models.ForeignKey(HypervisorConnection, on_delete=models.CASCADE, related_name="hosts")
    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="hosts")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    connected = models.BooleanField(default=True)
    maintenance = models.BooleanField(default=False)
    memory_bytes = models.BigIntegerField(default=0)
    cpu_model = models.CharField(max_length=200, blank=True)
    present = models.BooleanField(default=True, help_text="False once the last sync no longer saw it.")

    class Meta:
        unique_together = [("connection", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def usable(self) -> bool:
        return self.present and self.connected and not self.maintenance

    def unusable_reason(self) -> str:
        if not self.present:
            return "no longer in the hypervisor's inventory"
        if not self.connected:
            return "disconnected"
        if self.maintenance:
            return "in maintenance mode"
        return ""


class Datastore(models.Model):
    """A datastore (vCenter) or storage pool (libvirt), and the hosts that see it."""

    connection = models.ForeignKey(HypervisorConnection, on_delete=models.CASCADE, related_name="datastores")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    capacity_bytes = models.BigIntegerField(default=0)
    free_bytes = models.BigIntegerField(default=0)
    accessible = models.BooleanField(default=True)
    present = models.BooleanField(default=True)
    hosts = models.ManyToManyField(Host, related_name="datastores", blank=True)

    class Meta:
        unique_together = [("connection", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Network(models.Model):
    """A VM network and the hosts that carry it."""

    connection = models.ForeignKey(HypervisorConnection, on_delete=models.CASCADE, related_name="networks")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200)
    hosts = models.ManyToManyField(Host, related_name="networks", blank=True)

    class Meta:
        unique_together = [("connection", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class VirtualMachine(models.Model):
    """A VM and where it runs. Its disks (and so its datastores) are ``VirtualDisk`` rows."""

    connection = models.ForeignKey(HypervisorConnection, on_delete=models.CASCADE, related_name="vms")
    ref = models.CharField(max_length=200)
    name = models.CharField(max_length=200, db_index=True)
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="vms")
    power_state = models.CharField(max_length=20, choices=PowerState.choices, default=PowerState.ON)
    memory_bytes = models.BigIntegerField(default=0)
    vcpus = models.PositiveIntegerField(default=1)
    owner_group = models.ForeignKey(Group, null=True, blank=True, on_delete=models.SET_NULL, related_name="vms")
    tags = models.JSONField(default=list, blank=True)
    folder = models.CharField(max_length=500, blank=True)
    present = models.BooleanField(default=True, help_text="False once the last sync no longer saw it.")

    class Meta:
        unique_together = [("connection", "ref")]
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def disk_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.disks.all())

    def datastore_ids(self) -> set[int]:
        return {d.datastore_id for d in self.disks.all()}

    def placement_snapshot(self) -> dict:
        """Host and per-disk datastores by name, as recorded in audit entries (from the disks
        prefetched with their datastores when they were, else in one query)."""
        prefetched = "disks" in getattr(self, "_prefetched_objects_cache", {})
        disks = self.disks.all() if prefetched else self.disks.select_related("datastore")
        return {"host": self.host.name, "disks": {d.key: d.datastore.name for d in disks}}


class VirtualDisk(models.Model):
    """One virtual disk of a VM and the datastore that holds it."""

    vm = models.ForeignKey(VirtualMachine, on_delete=models.CASCADE, related_name="disks")
    key = models.CharField(max_length=100)
    label = models.CharField(max_length=200)
    datastore = models.ForeignKey(Datastore, on_delete=models.PROTECT, related_name="disks")
    capacity_bytes = models.BigIntegerField(default=0)
    path = models.CharField(max_length=1000, blank=True)

    class Meta:
        unique_together = [("vm", "key")]
        ordering = ["key"]

    def __str__(self) -> str:
        return f"{self.vm.name}/{self.label}"
