"""The VMs' virtual disks, read from the undecoded SOAP answer of one property retrieval.

pyvmomi decodes a VM's whole device list (a dozen devices, ~150 XML elements) into typed objects,
one Python call per element: for a 10,000-VM inventory that was ~85 % of the read. The portal
needs five fields of the disks only. So this retrieval takes the answer as it streams in, drops
the other devices' elements whole at the byte level (a device element never nests another, so what
is left is still well-formed XML; a sixth of the bytes), parses the rest with the standard
library's C XML parser and keeps those five fields. Every other property of the inventory still
goes through pyvmomi. ``disks_of`` (pyvmomi objects) and this module read the same fields:
a contract test compares them VM by VM against vcsim.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
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


class DiskListing:
    """Collects ``{vm ref: disks}`` from the XML of a RetrievePropertiesEx (or Continue...) answer
    fed in chunks; ``token`` is the paging token of the last answer ("" when it was the last page).
    Each VM's elements are dropped once read, so memory stays bounded whatever the inventory size."""

    def __init__(self) -> None:
        self.disks: dict[str, tuple[Disk, ...]] = {}
        self.token = ""
        self._parser: ET.XMLPullParser | None = None
        self._filter = DeviceFilter()

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
        disks = []
        for device in objects.iterfind(_DEVICES):
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
        self.disks[ref] = tuple(disks)


def read_vm_disks(collector: Any, stub: Any, spec: Any, *, page_size: int) -> dict[str, tuple[Disk, ...]]:
    """The disks of every VM a filter spec selects (its property set must ask for
    ``config.hardware.device`` only), following vCenter's paging to the end."""
    from drivers.vmware.inventory import PC

    listing = DiskListing()
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
    return listing.disks
