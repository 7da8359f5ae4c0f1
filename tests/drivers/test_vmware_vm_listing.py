"""The VMs read from the undecoded SOAP answer (drivers/vmware/vm_listing.py): the same values
pyvmomi's decoding gives, whatever the chunking of the stream; against vcsim, VM by VM."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from pyVmomi import SoapAdapter, VmomiSupport, vim, vmodl

from drivers.base import Disk
from drivers.vmware import disks_of
from drivers.vmware.vm_listing import DeviceFilter, VmListing

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


def soap_answer(devices_by_vm: dict[str, list], *, token: str | None = None, missing: dict | None = None,
                scalars: dict | None = None) -> bytes:
    """A RetrievePropertiesEx answer as vCenter writes it, serialized by pyvmomi itself."""
    objects = []
    for ref, devices in devices_by_vm.items():
        props = [vmodl.DynamicProperty(name=k, val=v) for k, v in (scalars or {}).items()]
        props.append(vmodl.DynamicProperty(name="config.hardware.device",
                                           val=vim.vm.device.VirtualDevice.Array(devices)))
        objects.append(PC.ObjectContent(obj=vim.VirtualMachine(ref, None), propSet=props))
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


def listing_of(answer: bytes, chunk: int) -> VmListing:
    listing = VmListing()
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


def test_scalar_properties_read_as_pyvmomi_gives_them():
    scalars = {
        "name": "web & db <01>",
        "parent": vim.Folder("group-v22", None),
        "runtime.host": vim.HostSystem("host-2", None),
        "runtime.powerState": vim.VirtualMachinePowerState.poweredOn,
        "config.template": False,
        "config.hardware.memoryMB": 4096,
        "config.hardware.numCPU": 2,
        "customValue": vim.CustomFieldsManager.Value.Array([
            vim.CustomFieldsManager.StringValue(key=101, value="team-web"),
            vim.CustomFieldsManager.StringValue(key=102, value=""),
        ]),
    }
    record = listing_of(soap_answer({"vm-1": DEVICES["vm-1"]}, scalars=scalars), 97).vms["vm-1"]
    assert record.props == {
        "name": "web & db <01>", "parent": "group-v22", "runtime.host": "host-2", "runtime.powerState": "poweredOn",
        "config.template": False, "config.hardware.memoryMB": 4096, "config.hardware.numCPU": 2,
        "customValue": ((101, "team-web"), (102, "")),
    }
    assert record.disks == disks_of(DEVICES["vm-1"])


@pytest.mark.peer("vcenter")
def test_inventory_vms_equal_what_pyvmomi_reads_on_vcsim(request):
    from tests import peers

    harness = peers.start("vcenter", request.session.config)
    inventory = harness.driver.inventory()
    assert inventory.vms
    for vm in inventory.vms:
        obj = vim.VirtualMachine(vm.ref, harness.observer._stub)
        expected = disks_of(obj.config.hardware.device)
        assert expected and vm.disks == expected, vm.ref
        assert (vm.name, vm.host_ref, vm.pool_ref, vm.vcpus, vm.memory_bytes) == (
            obj.name, obj.runtime.host._moId, obj.resourcePool._moId, obj.config.hardware.numCPU,
            obj.config.hardware.memoryMB * 1024**2), vm.ref
        assert vm.power_state.value == {"poweredOn": "on", "poweredOff": "off"}[obj.runtime.powerState], vm.ref
        assert vm.owner and vm.owner in {v.value for v in obj.customValue}, vm.ref
        assert vm.folder.endswith("/" + obj.parent.name), vm.ref


def test_pages_are_followed_with_the_token_vcenter_gives():
    from drivers.vmware.vm_listing import read_vms

    pages = {"RetrievePropertiesEx": soap_answer({"vm-1": DEVICES["vm-1"]}, token="page-2"),
             "ContinueRetrievePropertiesEx": soap_answer({"vm-2": DEVICES["vm-3"]})}
    calls = []

    class Stub:
        def invoke_streamed(self, mo, method, args, sink):
            calls.append((method, args[0] if method.startswith("Continue") else None))
            answer = pages[method]
            for i in range(0, len(answer), 100):
                sink(answer[i : i + 100])

    vms = read_vms(None, Stub(), PC.FilterSpec(), page_size=1)
    assert calls == [("RetrievePropertiesEx", None), ("ContinueRetrievePropertiesEx", "page-2")]
    assert {ref: vm.disks for ref, vm in vms.items()} == {"vm-1": disks_of(DEVICES["vm-1"]),
                                                          "vm-2": disks_of(DEVICES["vm-3"])}
