"""Simulated datacenters written as the simulator's own state file, for the move-plan tests.

``evacuation_state`` is one cluster of four hosts: ``src`` holds ``n_vms`` small VMs on the shared
datastore plus one VM on a datastore only ``src`` sees (it cannot move live); the other hosts are
empty, so every other VM has somewhere to go.
"""

from __future__ import annotations

import json
from pathlib import Path

from migrations_app.models import HypervisorConnection
from migrations_app.services.inventory import inventory_sync

GiB = 1024**3


def evacuation_state(n_vms: int = 20, *, memory_gib: int = 1, local_vm: bool = True, tags: dict | None = None,
                     host_memory_gib: int = 64) -> dict:
    hosts = [{"ref": f"host-{n}", "name": f"{n}.lab", "cluster": "cl-0", "connected": True, "maintenance": False,
              "memory": host_memory_gib * GiB} for n in ("src", "a", "b", "c")]
    datastores = [
        {"ref": "ds-shared", "name": "shared-ds", "capacity": 4096 * GiB, "used": 0, "hosts": [h["ref"] for h in hosts]},
        {"ref": "ds-local", "name": "src-local", "capacity": 512 * GiB, "used": 0, "hosts": ["host-src"]},
    ]
    vms = []
    for i in range(n_vms):
        vms.append({"ref": f"vm-{i}", "name": f"app-{i:02d}", "host": "host-src", "power": "on",
                    "memory": memory_gib * GiB, "vcpus": 1,
                    "disks": [{"key": "disk-0", "label": "Hard disk 1", "ds": "ds-shared", "size": 1 * GiB}],
                    "owner": "team-web", "tags": list((tags or {}).get(i, [])), "folder": "/team-web"})
    if local_vm:
        vms.append({"ref": "vm-local", "name": "pinned-local", "host": "host-src", "power": "on",
                    "memory": memory_gib * GiB, "vcpus": 1,
                    "disks": [{"key": "disk-0", "label": "Hard disk 1", "ds": "ds-local", "size": 1 * GiB}],
                    "owner": "team-data", "tags": [], "folder": "/team-data"})
    for vm in vms:
        for d in vm["disks"]:
            next(ds for ds in datastores if ds["ref"] == d["ds"])["used"] += d["size"]
    return {"datacenters": [{"ref": "dc-0", "name": "DC0"}], "clusters": [{"ref": "cl-0", "name": "Cluster-0", "dc": "dc-0"}],
            "hosts": hosts, "datastores": datastores, "vms": vms, "tasks": {}, "task_counter": 0}


def simulated_connection(path: Path, state: dict, *, name: str = "evac", **options) -> HypervisorConnection:
    """Write ``state`` as the simulator's state file, add the connection and sync its inventory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    conn = HypervisorConnection.objects.create(name=name, kind="simulator",
                                               options={"speed": 400, "tick_s": 0.02, **options,
                                                        "state_file": str(path)})
    inventory_sync(connection=conn)
    return conn
