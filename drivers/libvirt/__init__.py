"""libvirt driver: live migration, live storage migration and both, between libvirt/QEMU hosts.

The portal manages a set of libvirt daemons ("hosts") through one connection config; there is no
manager above them, so this driver is the manager: it groups hosts into clusters, sees the storage
pools of every host as datastores, finds a domain by its UUID wherever it runs, and drives
peer-to-peer migrations between daemons.

Options (``ConnectionConfig.options``)::

    {
      "hosts": [                                   # required, at least one
        {"name": "hosta",                          # host ref and label; unique
         "uri": "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",  # how *this process* connects
         "migration_uri": "qemu+tcp://10.213.77.1/system",  # how the *other daemons* reach it
         "cluster": "lab"},                        # same cluster name = may trade VMs (default: own)
        ...
      ],
      "shared_pools": ["shared"],        # pool names that are one shared directory on every host
                                         # defining them (libvirt cannot tell a directory is shared);
                                         # a path that differs between hosts marks it not accessible
      "datacenter": "libvirt",           # name of the one datacenter shown
      "keepalive_interval_s": 5, "keepalive_count": 3,   # dead connections are noticed and reopened
      "poll_interval_s": 0.25,           # jobStats / blockJobInfo sampling while a job runs
      "completion_timeout_per_gib_s": 800,  # budget when spec.timeout_s is not given (Nova's rule)
      "auto_converge": false,            # VIR_MIGRATE_AUTO_CONVERGE: throttle a guest that dirties fast
      "post_copy": false,                # VIR_MIGRATE_POSTCOPY, switched on after ...
      "post_copy_after_iterations": 2,   # ... this many pre-copy passes (no cancel after the switch)
    }

Refs (opaque to the portal): host ``hosta``; cluster ``cluster/lab``; datacenter ``dc/libvirt``;
datastore ``hosta/pool/images`` (a host's own pool) or ``pool/shared`` (a shared pool); VM
``uuid:<domain uuid>`` (the same on every host); network ``hosta/net/default``; task id
``<source host>/<uuid>/<start, UTC>/<target host or ->/<target datastore or ->``.

How moves map to libvirt:

- compute: ``migrateToURI3`` peer-to-peer with LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE; disks on
  a shared pool stay (+UNSAFE), disks on a host pool are copied into the pool of the same name and
  path on the target (+NON_SHARED_DISK) and the source copy is deleted after success;
- storage: per disk, a volume is created in the target pool, ``blockCopy`` (REUSE_EXT|TRANSIENT_JOB)
  mirrors into it, ``blockJobAbort(PIVOT)`` switches over, the old volume is deleted;
- both: the target volume is created in the chosen pool on the target host, then a migration with
  NON_SHARED_DISK copies into it (destination and persistent XML name the new paths).

Progress comes from ``jobStats()`` / ``blockJobInfo()`` sampled by the calling thread while a
helper thread sits in the blocking libvirt call (libvirt-python releases the GIL there), woken
early by MIGRATION_ITERATION, JOB_COMPLETED, LIFECYCLE and BLOCK_JOB_2 events, so ``on_progress``
runs in the caller's thread. The percent, budget and error decisions live in ``jobs``.

One concern per module: ``sdk`` (libvirt-python loaded lazily, the event loop, libvirt's errors as
the portal's), ``connections`` (the configured hosts, one connection each with keep-alive),
``inventory`` (the read side: refs, pools, domains, placement, task lookup), ``planning`` (what a
move does to each disk, preflight), ``moves`` (compute, storage and both, and the volumes they
create), ``progress`` (events and job sampling while a move runs), ``driver`` (``LibvirtDriver``,
which ties them together), and ``jobs`` / ``xml`` (pure decisions and XML, tested without the SDK).
"""

from drivers.libvirt.driver import LibvirtDriver
from drivers.libvirt.sdk import ensure_event_loop, load_sdk

__all__ = ["LibvirtDriver", "ensure_event_loop", "load_sdk"]
