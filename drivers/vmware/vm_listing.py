"""The VMs, read from the undecoded SOAP answer of one property retrieval.

pyvmomi decodes every element of an answer into typed objects, one Python call per element. A VM's
device list alone is a dozen devices and ~150 elements: for a 10,000-VM inventory, decoding the VMs
was ~90 % of the read. The portal needs a few scalar properties of each VM and five fields of its
disks. So this retrieval takes the answer as it streams in, drops the other devices' elements
whole at the byte level (a device element never nests another, so what is left is still
well-formed XML; a sixth of the bytes), parses the rest with the standard library's C XML parser
and keeps those values. Hosts, datastores, clusters and folders (few) still go through pyvmomi.
``disks_of`` (pyvmomi objects) and this module read the same fields: tests compare them, VM by VM
on vcsim.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from drivers.base import Disk

KiB = 1024
_V = "{urn:vim25}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_OBJECTS = f"{_V}objects"
_TOKEN = f"{_V}token"
_DEVICES = f"{_V}propSet/{_V}val/{_V}VirtualDevice"
_MISSING_FAULTS = f"{_V}missingSet/{_V}fault/{_V}fault"
DEVICE_PATH = "config.hardware.device"


_DEVICE_OPEN = b"<VirtualDevice"
_DEVICE_CLOSE = b"</VirtualDevice>"
_AFTER_NAME = frozenset(b" \t\r\n>/")
_DISK_TYPE = re.compile(rb"""[\s:]type=["'](?:[\w.-]+:)?VirtualDisk["']""")


class DeviceFilter:
    """Cuts every ``<VirtualDevice>`` element that is not a VirtualDisk out of an XML byte stream
    (fed in chunks of any size; returns what can be passed on so far)."""

    def __init__(self) -> None:
        self._carry = b""

    def __call__(self, chunk: bytes) -> bytes:
        data, pos, out = self._carry + chunk, 0, []
        while True:
            start = data.find(_DEVICE_OPEN, pos)
            tag_end = data.find(b">", start) if start >= 0 else -1
            if start < 0 or tag_end < 0:
                # Keep back what may be the beginning of the next device's start tag.
                keep = start if start >= 0 else max(pos, len(data) - len(_DEVICE_OPEN))
                out.append(data[pos:keep])
                self._carry = data[keep:]
                return b"".join(out)
            after = start + len(_DEVICE_OPEN)
            if data[after] not in _AFTER_NAME or data[tag_end - 1] == ord("/"):
                # Another element's name that starts so, or an empty device: passed on as it is.
                out.append(data[pos : tag_end + 1])
                pos = tag_end + 1
                continue
            end = data.find(_DEVICE_CLOSE, tag_end)
            if end < 0:
                out.append(data[pos:start])
                self._carry = data[start:]
                return b"".join(out)
            end += len(_DEVICE_CLOSE)
            out.append(data[pos:start])
            if _DISK_TYPE.search(data, start, tag_end + 1):
                out.append(data[start:end])
            pos = end

    def close(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest


def _type_name(element: ET.Element) -> str:
    """The xsi:type of an element without its namespace prefix ("vim25:VirtualDisk" -> "VirtualDisk")."""
    return element.get(_XSI_TYPE, "").rpartition(":")[2]


def _int(text: str | None) -> int:
    return int(text) if text else 0


@dataclass(frozen=True)
class VmRecord:
    """One VM's properties as read: scalars by property path (a managed object reference as its
    id, a custom attribute list as (key, value) pairs, an enum as its name) and its disks."""

    props: dict[str, Any]
    disks: tuple[Disk, ...]


def _value(val: ET.Element) -> Any:
    """A property value of the types the VM listing asks for."""
    kind = _type_name(val)
    if kind in ("int", "long", "short", "byte"):
        return int(val.text or 0)
    if kind == "boolean":
        return val.text == "true"
    if kind == "ArrayOfCustomFieldValue":
        return tuple((int(v.findtext(f"{_V}key") or 0), v.findtext(f"{_V}value") or "") for v in val)
    return val.text or ""  # string, enum, ManagedObjectReference (its id)


def _disks(val: ET.Element) -> tuple[Disk, ...]:
    disks = []
    for device in val.iterfind(f"{_V}VirtualDevice"):
        if _type_name(device) != "VirtualDisk":
            continue
        key = device.findtext(f"{_V}key") or ""
        capacity = _int(device.findtext(f"{_V}capacityInBytes")) or _int(device.findtext(f"{_V}capacityInKB")) * KiB
        disks.append(
            Disk(
                key=key,
                label=device.findtext(f"{_V}deviceInfo/{_V}label") or f"disk {key}",
                datastore_ref=device.findtext(f"{_V}backing/{_V}datastore") or "",
                capacity_bytes=capacity,
                path=device.findtext(f"{_V}backing/{_V}fileName") or "",
            )
        )
    return tuple(disks)


class VmListing:
    """Collects ``{vm ref: VmRecord}`` from the XML of a RetrievePropertiesEx (or Continue...)
    answer fed in chunks; ``token`` is the paging token of the last answer ("" on the last page).
    Each VM's elements are dropped once read, so memory stays bounded whatever the inventory size."""

    def __init__(self) -> None:
        self.vms: dict[str, VmRecord] = {}
        self.token = ""
        self._parser: ET.XMLPullParser | None = None
        self._filter = DeviceFilter()

    @property
    def disks(self) -> dict[str, tuple[Disk, ...]]:
        return {ref: vm.disks for ref, vm in self.vms.items()}

    def start_answer(self) -> None:
        """Begin a new SOAP answer (the first page or a continuation)."""
        self._parser = ET.XMLPullParser(events=("end",))
        self._filter = DeviceFilter()
        self.token = ""

    def feed(self, chunk: bytes) -> None:
        assert self._parser is not None, "start_answer() first"
        self._parser.feed(self._filter(chunk))
        self._drain()

    def end_answer(self) -> None:
        assert self._parser is not None, "start_answer() first"
        self._parser.feed(self._filter.close())
        self._parser.close()
        self._drain()
        self._parser = None

    def _drain(self) -> None:
        for _, element in self._parser.read_events():
            if element.tag == _OBJECTS:
                self._object(element)
                element.clear()
            elif element.tag == _TOKEN:
                self.token = element.text or ""

    def _object(self, objects: ET.Element) -> None:
        for fault in objects.iterfind(_MISSING_FAULTS):
            # vcsim answers an expired session with per-property NotAuthenticated instead of a
            # fault: raise it so the driver logs in again, as ``retrieve`` does.
            if _type_name(fault) == "NotAuthenticated":
                raise vim.fault.NotAuthenticated()
        ref = objects.findtext(f"{_V}obj")
        if not ref:
            return
        props, disks = {}, ()
        for prop in objects.iterfind(f"{_V}propSet"):
            name, val = prop.findtext(f"{_V}name"), prop.find(f"{_V}val")
            if val is None:
                continue
            if name == DEVICE_PATH:
                disks = _disks(val)
            else:
                props[name] = _value(val)
        self.vms[ref] = VmRecord(props, disks)


def read_vms(collector: Any, stub: Any, spec: Any, *, page_size: int) -> dict[str, VmRecord]:
    """The VMs a filter spec selects, with the properties it asks for (scalars, custom values and
    ``config.hardware.device``), following vCenter's paging to the end."""
    from drivers.vmware.inventory import PC

    listing = VmListing()
    listing.start_answer()
    stub.invoke_streamed(
        collector, "RetrievePropertiesEx", [[spec], PC.RetrieveOptions(maxObjects=page_size)], listing.feed
    )
    listing.end_answer()
    while listing.token:
        token = listing.token
        listing.start_answer()
        stub.invoke_streamed(collector, "ContinueRetrievePropertiesEx", [token], listing.feed)
        listing.end_answer()
    return listing.vms
