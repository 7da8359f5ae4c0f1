"""The VMs' disks read from the undecoded SOAP answer (drivers/vmware/disk_listing.py): the same
fields pyvmomi's decoding gives, whatever the chunking of the stream; against vcsim, VM by VM."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from pyVmomi import SoapAdapter, VmomiSupport, vim, vmodl

from drivers.base import Disk
from drivers.vmware import disks_of
from drivers.vmware.disk_listing import DeviceFilter, DiskListing

PC = vmodl.query.PropertyCollector
VERSION = VmomiSupport.versionMap["vim25/6.5"]


def disk(key: int, *, datastore: str | None = "datastore-15", kb: int = 1024, in_bytes: int | None = None,
         label: str = "Hard disk 1", name: str = "[DS] web-01/web-01.vmdk") -> vim.vm.device.VirtualDisk:
    return vim.vm.device.VirtualDisk(
        key=key,
        capacityInKB=kb,
        capacityInBytes=in_bytes,
        deviceInfo=vim.Description(label=label, summary=""),
        controllerKey=1000,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=name,
            datastore=vim.Datastore(datastore, None) if datastore else None,
            diskMode="persistent",
        ),
    )


def soap_answer(devices_by_vm: dict[str, list], *, token: str | None = None, missing: dict | None = None) -> bytes:
    """A RetrievePropertiesEx answer as vCenter writes it, serialized by pyvmomi itself."""
    objects = []
    for ref, devices in devices_by_vm.items():
        prop = vmodl.DynamicProperty(name="config.hardware.device", val=vim.vm.device.VirtualDevice.Array(devices))
        objects.append(PC.ObjectContent(obj=vim.VirtualMachine(ref, None), propSet=[prop]))
    for ref, fault in (missing or {}).items():
        objects.append(PC.ObjectContent(obj=vim.VirtualMachine(ref, None),
                                        missingSet=[PC.MissingProperty(path="config.hardware.device", fault=fault)]))
    body = SoapAdapter.Serialize(
        PC.RetrieveResult(token=token, objects=objects),
        info=VmomiSupport.Object(name="returnval", type=PC.RetrieveResult, version=VERSION, flags=0),
        version=VERSION,
        nsMap={"urn:vim25": ""},
    )
    return (
        b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        b'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>'
        b'<RetrievePropertiesExResponse xmlns="urn:vim25">' + body
        + b"</RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"
    )


def listing_of(answer: bytes, chunk: int) -> DiskListing:
    listing = DiskListing()
    listing.start_answer()
    for i in range(0, len(answer), chunk):
        listing.feed(answer[i : i + chunk])
    listing.end_answer()
    return listing


DEVICES = {
    "vm-1": [
        vim.vm.device.VirtualE1000(key=4000, deviceInfo=vim.Description(label="Network adapter 1", summary="")),
        disk(2000, name="[DS & co] web-01/web-01.vmdk"),
        vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing"),
        disk(2001, datastore="datastore-16", in_bytes=5 * 1024**3, label="Hard disk 2"),
    ],
    "vm-2": [vim.vm.device.VirtualCdrom(key=3000, controllerKey=200)],  # no disk at all
    "vm-3": [disk(2000, datastore=None, kb=2048)],  # a backing without a datastore
}


@pytest.mark.parametrize("chunk", [1, 7, 16, 63, 200, 1 << 20])
def test_disks_match_pyvmomis_decoding_whatever_the_chunks(chunk):
    listing = listing_of(soap_answer(DEVICES, token="page-2"), chunk)
    assert listing.disks == {ref: disks_of(devices) for ref, devices in DEVICES.items()}
    assert listing.disks["vm-1"][0] == Disk("2000", "Hard disk 1", "datastore-15", 1024 * 1024,
                                            "[DS & co] web-01/web-01.vmdk")
    assert listing.disks["vm-1"][1].capacity_bytes == 5 * 1024**3  # capacityInBytes wins over KB
    assert listing.disks["vm-2"] == () and listing.disks["vm-3"][0].datastore_ref == ""
    assert listing.token == "page-2"


def test_the_last_page_has_no_token():
    assert listing_of(soap_answer(DEVICES), 4096).token == ""


def test_the_filter_keeps_the_disks_and_well_formed_xml():
    answer = soap_answer(DEVICES)
    kept = DeviceFilter()
    out = b"".join(kept(answer[i : i + 5]) for i in range(0, len(answer), 5)) + kept.close()
    root = ET.fromstring(out)  # still well-formed
    types = [d.get("{http://www.w3.org/2001/XMLSchema-instance}type") for d in root.iter("{urn:vim25}VirtualDevice")]
    assert types == ["VirtualDisk", "VirtualDisk", "VirtualDisk"]
    assert len(out) < len(answer)


def test_the_filter_passes_other_elements_whose_name_starts_alike():
    xml = b'<a><VirtualDeviceSpec x="1"><b/></VirtualDeviceSpec><VirtualDevice type="X"><k/></VirtualDevice></a>'
    kept = DeviceFilter()
    assert kept(xml) + kept.close() == b'<a><VirtualDeviceSpec x="1"><b/></VirtualDeviceSpec></a>'


def test_an_expired_session_reported_per_property_is_raised():
    answer = soap_answer({}, missing={"vm-9": vim.fault.NotAuthenticated()})
    with pytest.raises(vim.fault.NotAuthenticated):
        listing_of(answer, 1 << 20)


@pytest.mark.peer("vcenter")
def test_inventory_disks_equal_pyvmomis_device_lists_on_vcsim(request):
    from tests import peers

    harness = peers.start("vcenter", request.session.config)
    inventory = harness.driver.inventory()
    assert inventory.vms
    for vm in inventory.vms:
        expected = disks_of(vim.VirtualMachine(vm.ref, harness.observer._stub).config.hardware.device)
        assert expected and vm.disks == expected, vm.ref
