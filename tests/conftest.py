"""Shared fixtures: a small simulated datacenter synced into the portal, and users in each role."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, VirtualMachine
from migrations_app.services.inventory import inventory_sync


def client_for(user) -> Client:
    """A test client logged in as ``user``."""
    c = Client()
    c.force_login(user)
    return c

def pytest_collection_modifyitems(config, items):
    """Deselect (never skip) the tests of peers that DRIVER_KINDS leaves out."""
    from tests import peers

    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("peer")
        (drop if marker and marker.args[0] not in peers.SELECTED else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


FAST_SIM = {"speed": 400, "tick_s": 0.02, "vms": 12, "clusters": 2, "hosts_per_cluster": 3, "datastores": 3}


@pytest.fixture(autouse=True)
def _simulator_state(tmp_path, settings):
    """Each test gets its own simulated datacenter state."""
    settings.PORTAL = {**settings.PORTAL, "SIMULATOR_STATE_DIR": str(tmp_path / "sim")}
    # Real hashing costs ~0.3 s a user; tests log in as many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    from django.core.cache import cache

    cache.clear()  # login failure counts belong to one test


def make_user(username: str, *roles: Role, teams: tuple[str, ...] = ()) -> User:
    user = User.objects.create_user(username=username, password="pw-" + username)
    for name in [r.value for r in roles] + list(teams):
        user.groups.add(Group.objects.get_or_create(name=name)[0])
    return user


@pytest.fixture
def datacenter(db):
    conn = HypervisorConnection.objects.create(name="sim", kind="simulator", options=dict(FAST_SIM))
    inventory_sync(connection=conn)
    return conn


@pytest.fixture
def users(db):
    return {
        "alice": make_user("alice", Role.REQUESTER, teams=("team-web", "team-data", "team-ops")),
        "bob": make_user("bob", Role.APPROVER, Role.REQUESTER, teams=("team-web",)),
        "erin": make_user("erin", Role.APPROVER),
        "dave": make_user("dave", Role.AUDITOR),
        "carol": make_user("carol", Role.ADMIN),
        "mallory": make_user("mallory", Role.REQUESTER, teams=("team-elsewhere",)),
    }


def running_vm(conn, *, exclude_tags=("sim:",)) -> VirtualMachine:
    for vm in VirtualMachine.objects.filter(connection=conn, power_state="on", owner_group__name="team-web").order_by("pk"):
        if not any(t.startswith(p) for t in vm.tags for p in exclude_tags):
            return vm
    raise AssertionError("no running team-web VM in the simulated datacenter")


def other_host_same_cluster(vm):
    from migrations_app.selectors import host_choices

    return next(c.obj for c in host_choices(vm) if c.valid)


def other_cluster_host(vm):
    from migrations_app.models import Host

    return Host.objects.filter(connection=vm.connection).exclude(cluster=vm.host.cluster).first()


REVIEW_EVERYTHING = {
    "name": "Review everything (tests)",
    "description": "One approver for every request: the behaviour the tests written before policies assume.",
    "rules": [{"name": "Every request needs one approver", "when": {}, "action": "stages",
               "stages": [{"name": "Review", "groups": ["approver"], "mode": "any"}]}],
}


def install_policy(document: dict):
    """Install and activate a policy document as the active policy (through the import service)."""
    from migrations_app.services.policies import approval_policy_import

    for role in Role:
        Group.objects.get_or_create(name=role.value)
    # Fixtures install the policy before the users exist: the groups' signers are not counted.
    return approval_policy_import(actor=None, document=document, activate=True, require_signers=False)


@pytest.fixture
def review_everything(request):
    """The active policy makes every request wait for one approver (role ``approver``). Modules
    whose tests need pending requests of any VM use it; the shipped risk-based policy is tested in
    tests/test_policy.py and tests/services/test_approvals.py."""
    if "browser" in request.fixturenames:
        # Start Playwright first: the test's ORM calls all run inside its loop then, on the one
        # connection that the end of the test closes (a connection opened before the loop starts
        # would stay open and keep the test database from being dropped).
        request.getfixturevalue("browser")
    request.getfixturevalue("transactional_db" if "transactional_db" in request.fixturenames else "db")
    return install_policy(REVIEW_EVERYTHING)


def approved_run(user, approver, vm, **kw):
    """Submit a move of ``vm`` (compute within its cluster unless ``kind`` says otherwise) and
    approve it; its queued run."""
    from migrations_app.choices import MigrationKind
    from migrations_app.models import MigrationRun
    from migrations_app.services import requests as svc

    kw.setdefault("kind", MigrationKind.COMPUTE)
    if kw["kind"] != MigrationKind.STORAGE:
        kw.setdefault("target_host", other_host_same_cluster(vm))
    mr = svc.migration_request_submit(requester=user, vm=vm, reason="test", **kw)
    svc.migration_request_approve(request=mr, actor=approver)
    return MigrationRun.objects.get(request=mr)
