"""Pure helpers of the vCenter driver, pinned without a vCenter (pyvmomi objects built offline).

The driver as a whole is proven against vcsim by the contract suite (DRIVER_KINDS=vcenter)."""

from __future__ import annotations

import ssl

import pytest
from pyVmomi import vim, vmodl

from drivers.base import (
    AuthenticationFailed,
    ConnectionConfig,
    ConnectionFailed,
    Disk,
    DriverError,
    InsufficientResources,
    InvalidState,
    MigrationCancelled,
    MigrationFailed,
    MigrationSpec,
    NotFound,
    PermissionDenied,
    TaskState,
    Unsupported,
)
from drivers.vmware import (
    DatastoreFacts,
    HostFacts,
    MoveFacts,
    VCenterDriver,
    VmFacts,
    abort_reason,
    assess_move,
    disks_of,
    domain_error,
    fault_text,
    parse_endpoint,
    progress_percent,
    relocate_spec,
    ssl_context,
    task_state,
)

# A throwaway self-signed CA (P-256), only to feed ssl_context.
TEST_CA = """-----BEGIN CERTIFICATE-----
MIIBezCCASGgAwIBAgIUAz/DPCVFzf/EPruFUQtA1xbgkTAwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAgFw0yNjExMjgwODEwMTNaGA8yMTI2MTEwNDA4
MTAxM1owEjEQMA4GA1UEAwwHdGVzdC1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABFHcu8dTFHpbzqvPaK1Zw/WlNvXc7V2wo2Who8b6bqWfrJion4U4h7O+uMd5
jPBX6s2AiGrmAJ2yj732LQLbkuyjUzBRMB0GA1UdDgQWBBRrtDlb8qMMOewfrgRe
25Kco97eGTAfBgNVHSMEGDAWgBRrtDlb8qMMOewfrgRe25Kco97eGTAPBgNVHRMB
Af8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCyqAdQvFiy7ix7t9Eguor2yNMh
mFMGD2an1znTx1cHagIgVybpjA6GBcuIawuwZ9Iin2IlonM1OeITEAWkm4UI8UY=
-----END CERTIFICATE-----
"""
SECRET = "s3cret-Pa55"


def config(**kwargs) -> ConnectionConfig:
    return ConnectionConfig(
        kind="vcenter", **{"url": "vc.example.com", "username": "svc", "password": SECRET, **kwargs}
    )


# -- endpoint, TLS, secrets --------------------------------------------------------------------


def test_a_bare_host_name_means_https_on_443_at_sdk():
    ep = parse_endpoint(config())
    assert (ep.scheme, ep.host, ep.port, ep.path) == ("https", "vc.example.com", 443, "/sdk")


def test_credentials_in_the_url_are_used_when_the_config_has_none():
    ep = parse_endpoint(config(url="https://user:pa%3Ass@127.0.0.1:8989/sdk", username="", password=""))
    assert (ep.username, ep.password, ep.port) == ("user", "pa:ss", 8989)
    assert "pa:ss" not in str(ep) and "pa:ss" not in repr(ep)


@pytest.mark.parametrize("overrides", [{"url": "http://vc.example.com/sdk"}, {"verify_tls": False}])
def test_plain_http_and_unverified_tls_are_refused_outside_a_lab(overrides):
    with pytest.raises(ConnectionFailed) as err:
        parse_endpoint(config(**overrides))
    assert err.value.code == "insecure-config"
    assert parse_endpoint(config(is_lab=True, **overrides))


def test_tls_is_verified_by_default_and_against_a_given_ca_bundle(tmp_path):
    default = ssl_context(config())
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    from_text = ssl_context(config(ca_bundle=TEST_CA))
    assert from_text.verify_mode == ssl.CERT_REQUIRED and len(from_text.get_ca_certs()) == 1
    path = tmp_path / "ca.pem"
    path.write_text(TEST_CA)
    assert len(ssl_context(config(ca_bundle=str(path))).get_ca_certs()) == 1


def test_only_a_lab_connection_may_skip_tls_verification():
    assert ssl_context(config(verify_tls=False, is_lab=True)).verify_mode == ssl.CERT_NONE


def test_the_driver_is_lazy_and_keeps_the_password_out_of_its_repr():
    driver = VCenterDriver(config())  # no network: nothing listens on vc.example.com
    assert SECRET not in repr(driver) and SECRET not in repr(driver.config)
    assert driver.round_trips == 0


# -- waiting and progress --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cancel", "elapsed", "timeout", "expected"),
    [
        (False, 5.0, None, None),
        (False, 5.0, 10.0, None),
        (False, 10.5, 10.0, "timeout"),
        (True, 1.0, 10.0, "cancel"),
        (True, 11.0, 10.0, "cancel"),  # the user's cancel wins over the budget
    ],
)
def test_abort_reason(cancel, elapsed, timeout, expected):
    assert abort_reason(cancel_requested=cancel, elapsed_s=elapsed, timeout_s=timeout) == expected


def test_progress_never_goes_back_and_stays_below_100_until_done():
    assert progress_percent(None, 12.0) == 12.0
    assert progress_percent(5, 12.0) == 12.0
    assert progress_percent(40, 12.0) == 40.0
    assert progress_percent(100, 40.0) == 99.0


@pytest.mark.parametrize(
    ("state", "error", "expected"),
    [
        ("queued", None, TaskState.RUNNING),
        ("running", None, TaskState.RUNNING),
        ("success", None, TaskState.SUCCEEDED),
        ("error", vim.fault.InvalidState(msg="no"), TaskState.FAILED),
        ("error", vmodl.fault.RequestCanceled(msg="cancelled"), TaskState.CANCELLED),
        (None, None, TaskState.UNKNOWN),
    ],
)
def test_task_state(state, error, expected):
    assert task_state(state, error) == expected


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        (vim.fault.InvalidLogin(msg="Cannot complete login"), AuthenticationFailed),
        (vim.fault.NotAuthenticated(msg="session gone"), AuthenticationFailed),
        (vim.fault.NoPermission(msg="denied", privilegeId="Resource.HotMigrate"), PermissionDenied),
        (vmodl.fault.ManagedObjectNotFound(msg="gone", obj=vim.VirtualMachine("vm-9", None)), NotFound),
        (vim.fault.InsufficientResourcesFault(msg="not enough memory"), InsufficientResources),
        (vim.fault.InvalidPowerState(msg="powered off"), InvalidState),  # subclasses count
        (vim.fault.InvalidState(msg="busy"), InvalidState),
        (vmodl.fault.RequestCanceled(msg="cancelled"), MigrationCancelled),
        (vmodl.fault.MethodNotFound(msg="no such method"), Unsupported),
        (vim.fault.MigrationFault(msg="vMotion failed"), MigrationFailed),
    ],
)
def test_vcenter_faults_map_to_domain_errors_and_keep_vcenters_message(fault, error_class):
    error = domain_error(fault, default=MigrationFailed)
    assert type(error) is error_class
    assert error.hypervisor_message == fault.msg
    assert error.explanation()


def test_not_found_names_the_object_and_unknown_faults_use_the_default():
    error = domain_error(vmodl.fault.ManagedObjectNotFound(obj=vim.HostSystem("host-7", None)))
    assert "host host-7" in error.message
    assert type(domain_error(vim.fault.MigrationFault(msg="x"))) is DriverError


def test_fault_text_falls_back_to_fault_messages_then_the_fault_name():
    assert fault_text(vim.fault.InvalidState(msg="busy")) == "busy"
    with_messages = vim.fault.InvalidState(faultMessage=[vmodl.LocalizableMessage(key="k", message="VM is busy")])
    assert fault_text(with_messages) == "VM is busy"
    assert fault_text(vim.fault.InvalidState()) == "InvalidState"


# -- judging a move ---------------------------------------------------------------------------

GiB = 1024**3


def facts(*, power="poweredOn", host=None, datastore=None, disks_on="ds-1") -> MoveFacts:
    disks = (Disk("2000", "Hard disk 1", disks_on, 40 * GiB), Disk("2001", "Hard disk 2", disks_on, 20 * GiB))
    vm = VmFacts("vm-1", "web-01", power, "host-1", "resgroup-1", "domain-c1", disks, (disks_on,))
    return MoveFacts(vm, host, datastore)


def host(ref="host-2", cluster="domain-c1", connected=True, maintenance=False, sees=("ds-1", "ds-2")) -> HostFacts:
    return HostFacts(ref, f"esx-{ref}", cluster, "resgroup-9", connected, maintenance, tuple(sees))


def store(ref="ds-2", free=100 * GiB, hosts=("host-1", "host-2")) -> DatastoreFacts:
    return DatastoreFacts(ref, f"store-{ref}", free, True, tuple(hosts))


def first_failure(move_facts: MoveFacts, spec: MigrationSpec):
    return next((c for c in assess_move(move_facts, spec) if not c.ok), None)


def test_a_valid_compute_move_passes_every_check():
    assert first_failure(facts(host=host()), MigrationSpec("vm-1", target_host_ref="host-2")) is None


@pytest.mark.parametrize(
    ("move_facts", "spec", "name", "error"),
    [
        (
            facts(power="poweredOff", host=host()),
            MigrationSpec("vm-1", target_host_ref="host-2"),
            "vm-powered-on",
            InvalidState,
        ),
        (
            facts(host=host("host-1")),
            MigrationSpec("vm-1", target_host_ref="host-1"),
            "target-is-another-host",
            InvalidState,
        ),
        (
            facts(host=host(cluster="domain-c2")),
            MigrationSpec("vm-1", target_host_ref="host-2"),
            "same-cluster",
            InvalidState,
        ),
        (
            facts(host=host(connected=False)),
            MigrationSpec("vm-1", target_host_ref="host-2"),
            "host-connected",
            InvalidState,
        ),
        (
            facts(host=host(maintenance=True)),
            MigrationSpec("vm-1", target_host_ref="host-2"),
            "host-not-in-maintenance",
            InvalidState,
        ),
        (
            facts(host=host(sees=("ds-2",))),
            MigrationSpec("vm-1", target_host_ref="host-2"),
            "host-sees-vm-datastores",
            InvalidState,
        ),
        (
            facts(datastore=store("ds-1")),
            MigrationSpec("vm-1", target_datastore_ref="ds-1"),
            "disks-not-already-there",
            InvalidState,
        ),
        (
            facts(datastore=store(hosts=("host-2",))),
            MigrationSpec("vm-1", target_datastore_ref="ds-2"),
            "datastore-mounted-on-host",
            InvalidState,
        ),
        (
            facts(datastore=store(free=50 * GiB)),
            MigrationSpec("vm-1", target_datastore_ref="ds-2"),
            "datastore-has-room",
            InsufficientResources,
        ),
    ],
)
def test_a_move_is_refused_for_the_first_rule_it_breaks(move_facts, spec, name, error):
    failed = first_failure(move_facts, spec)
    assert (failed.name, failed.error) == (name, error)
    assert failed.message


def test_a_combined_move_checks_the_datastore_against_the_target_host():
    spec = MigrationSpec("vm-1", target_host_ref="host-2", target_datastore_ref="ds-2")
    assert first_failure(facts(host=host(), datastore=store(hosts=("host-2",))), spec) is None
    failed = first_failure(facts(host=host(), datastore=store(hosts=("host-1",))), spec)
    assert failed.name == "datastore-mounted-on-host"


def test_relocate_spec_keeps_the_pool_inside_the_cluster_and_moves_every_disk():
    spec = relocate_spec(facts(host=host(), datastore=store()), stub=None)
    assert spec.host._moId == "host-2" and spec.pool._moId == "resgroup-1"
    assert spec.datastore._moId == "ds-2"
    assert [(d.diskId, d.datastore._moId) for d in spec.disk] == [(2000, "ds-2"), (2001, "ds-2")]
    compute_only = relocate_spec(facts(host=host()), stub=None)
    assert compute_only.datastore is None and not compute_only.disk


def test_disks_are_read_from_the_device_list_with_their_backing_datastore():
    disk = vim.vm.device.VirtualDisk(
        key=2000,
        capacityInKB=1024,
        deviceInfo=vim.Description(label="Hard disk 1", summary=""),
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[LocalDS_0] web-01/web-01.vmdk",
            datastore=vim.Datastore("datastore-15", None),
            diskMode="persistent",
        ),
    )
    nic = vim.vm.device.VirtualE1000(key=4000)
    assert disks_of([nic, disk]) == (
        Disk("2000", "Hard disk 1", "datastore-15", 1024 * 1024, "[LocalDS_0] web-01/web-01.vmdk"),
    )
