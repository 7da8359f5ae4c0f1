"""Reading and writing the libvirt XML the libvirt driver needs, without the SDK.

Domain, volume and capabilities documents are parsed here into plain tuples, and the few
documents the driver sends (a volume to create, a block copy destination, a domain definition
with disks at new paths) are written here, so all of it is unit-tested on literal XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

# The namespace of the portal's own domain metadata (owner, tags), as lab/kvm/lab.sh writes it:
# <metadata><portal:vm xmlns:portal="urn:migration-portal:vm:1"><portal:owner>team-web</portal:owner>
# <portal:tags>env:dev lab:never-converge</portal:tags></portal:vm></metadata>
METADATA_NS = "urn:migration-portal:vm:1"


@dataclass(frozen=True)
class DomainDisk:
    """One file-backed disk of a domain: target dev ("vda"), image path and format ("qcow2")."""

    dev: str
    path: str
    format: str


@dataclass(frozen=True)
class DomainFacts:
    """What the driver needs from a domain's XML."""

    disks: tuple[DomainDisk, ...]
    owner: str
    tags: tuple[str, ...]
    cpu_model: str  # the guest CPU model of a custom CPU, "" for host-model / host-passthrough
    emulator: str
    arch: str
    machine: str
    virt_type: str  # "qemu" (TCG) or "kvm"


def parse_domain(xml: str) -> DomainFacts:
    root = ET.fromstring(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue  # CD-ROMs and floppies are not migrated storage
        source = disk.find("source")
        target = disk.find("target")
        if source is None or target is None or not source.get("file"):
            continue  # only file-backed disks live in directory pools
        driver = disk.find("driver")
        disks.append(
            DomainDisk(
                dev=target.get("dev", ""),
                path=source.get("file", ""),
                format=(driver.get("type") if driver is not None else None) or "raw",
            )
        )
    meta = root.find(f"./metadata/{{{METADATA_NS}}}vm")
    owner = ""
    tags: tuple[str, ...] = ()
    if meta is not None:
        owner = (meta.findtext(f"{{{METADATA_NS}}}owner") or "").strip()
        tags = tuple((meta.findtext(f"{{{METADATA_NS}}}tags") or "").split())
    cpu = root.find("./cpu")
    cpu_model = ""
    if cpu is not None and cpu.get("mode", "custom") == "custom":
        cpu_model = (cpu.findtext("model") or "").strip()
    os_type = root.find("./os/type")
    return DomainFacts(
        disks=tuple(disks),
        owner=owner,
        tags=tags,
        cpu_model=cpu_model,
        emulator=(root.findtext("./devices/emulator") or "").strip(),
        arch=os_type.get("arch", "") if os_type is not None else "",
        machine=os_type.get("machine", "") if os_type is not None else "",
        virt_type=root.get("type", ""),
    )


def with_disk_paths(xml: str, new_paths: dict[str, str]) -> str:
    """The domain XML with the source file of each disk in ``new_paths`` (by target dev) changed:
    the destination (and persistent) definition of a migration that moves disks to another pool."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        if target is not None and source is not None and target.get("dev") in new_paths:
            source.set("file", new_paths[target.get("dev", "")])
    return ET.tostring(root, encoding="unicode")


def volume_xml(name: str, capacity_bytes: int, fmt: str) -> str:
    """A volume to create in a directory pool before a copy lands in it."""
    return (
        f"<volume><name>{_text(name)}</name><capacity unit='bytes'>{int(capacity_bytes)}</capacity>"
        f"<target><format type={quoteattr(fmt)}/></target></volume>"
    )


def block_copy_destination_xml(path: str, fmt: str) -> str:
    """The destination of ``blockCopy``: a plain file disk (libvirt 9.0 rejects type='volume')."""
    return f"<disk type='file'><driver type={quoteattr(fmt)}/><source file={quoteattr(path)}/></disk>"


def pool_target_path(xml: str) -> str:
    return (ET.fromstring(xml).findtext("./target/path") or "").rstrip("/")


def pool_type(xml: str) -> str:
    return ET.fromstring(xml).get("type", "")


def host_cpu(capabilities_xml: str) -> tuple[str, str]:
    """(model, the <cpu> element as XML for compareCPU) of a host from its capabilities."""
    cpu = ET.fromstring(capabilities_xml).find("./host/cpu")
    if cpu is None:
        return "", ""
    return (cpu.findtext("model") or "").strip(), ET.tostring(cpu, encoding="unicode")


def guest_cpu_xml(model: str) -> str:
    return f"<cpu mode='custom' match='exact'><model fallback='forbid'>{_text(model)}</model></cpu>"


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
