"""A canary password on a vCenter connection is found nowhere but its encrypted column: not in a
database dump, not in Redis traffic while a migration runs, not in the portal's logs, not in
websocket frames, not in any rendered page."""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from django.conf import settings as django_settings

from migrations_app.choices import Role
from migrations_app.models import HypervisorConnection, MigrationRequest, VirtualMachine
from migrations_app.selectors import host_choices
from migrations_app.services.inventory import inventory_sync
from tests.conftest import make_user
from tests.drivers.peer_vcenter import REPO, _vcsim

pytestmark = [pytest.mark.e2e, pytest.mark.peer("vcenter"), pytest.mark.usefixtures("review_everything")]
CANARY = "Canary-7f3a9c2e-Secret"


class RedisTap:
    """Every command Redis executes while the tap is open (MONITOR), as text."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            while not self.stop.is_set():
                self.seen.append(str(monitor.next_command()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.client.ping()  # one more command wakes the reader
        self.thread.join(5)


def test_a_canary_password_leaks_nowhere(login, api, live_portal, tmp_path, settings):
    from django.conf import global_settings

    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS
    run_dir = tempfile.mkdtemp(prefix="vcsim-canary-", dir=REPO / "lab" / "run")
    url = urlsplit(_vcsim("start", "-cluster", "1", "-host", "2", "-standalone", "0", "-vm", "1", "-ds", "2",
                          "-login", f"svc:{CANARY}", run_dir=run_dir))
    try:
        assert url.password == CANARY
        conn = HypervisorConnection(name="vc-canary", kind="vcenter", url=f"https://{url.hostname}:{url.port}/sdk",
                                    username="svc", ca_bundle=Path(run_dir, "cert.pem").read_text())
        conn.set_password(CANARY)
        conn.save()
        inventory_sync(connection=conn)
        alice = make_user("alice", Role.ADMIN)
        bob = make_user("bob", Role.APPROVER)
        for user in (alice, bob):
            user.set_password("pw-" + user.username)
            user.is_staff = user.is_superuser = user is alice
            user.save()
        vm = VirtualMachine.objects.filter(connection=conn).order_by("name").first()
        target = next(c.obj for c in host_choices(vm) if c.valid)

        frames: list[str] = []
        pages: list[str] = []
        with RedisTap(live_portal["redis_url"]) as tap:
            page = login("alice", "pw-alice")
            page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(str(payload))))
            created = api("alice", "pw-alice")("/api/requests/", {
                "vm_id": vm.pk, "target_host_id": target.pk, "reason": "canary"})
            page.goto(live_portal["url"] + f"/requests/{created['id']}/")
            api("bob", "pw-bob")(f"/api/requests/{created['id']}/approve/", {})
            page.wait_for_selector("#request-status:is([data-status='succeeded'], [data-status='failed'], "
                                   "[data-status='errored'])", timeout=30000)
            for path in ("/inventory/", f"/vms/{vm.pk}/", f"/requests/{created['id']}/", "/audit/",
                         f"/admin/migrations_app/hypervisorconnection/{conn.pk}/change/",
                         "/admin/migrations_app/hypervisorconnection/", "/api/requests/"):
                page.goto(live_portal["url"] + path)
                pages.append(page.content())
        done = MigrationRequest.objects.select_related("run").get(pk=created["id"])
        assert done.status == "succeeded", done.run.explanation
        assert tap.seen and frames and len(pages) == 7  # the taps saw real traffic

        db = django_settings.DATABASES["default"]
        dump = subprocess.run(
            ["pg_dump", "--data-only", f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"],
            capture_output=True, text=True, check=True).stdout
        logs = "".join(p.read_text() for p in live_portal["logs"].values())
        places = {"database dump": dump, "redis traffic": "\n".join(tap.seen), "logs": logs,
                  "websocket frames": "\n".join(frames), "pages": "\n".join(pages)}
        for where, text in places.items():
            assert CANARY not in text, f"the canary password leaked into the {where}"
        # It is there, encrypted, and only the portal's key opens it.
        stored = HypervisorConnection.objects.values_list("password_encrypted", flat=True).get(pk=conn.pk)
        assert re.fullmatch(r"fernet:[A-Za-z0-9_=-]+", stored) and stored in dump
        assert HypervisorConnection.objects.get(pk=conn.pk).get_password() == CANARY
    finally:
        _vcsim("stop", run_dir=run_dir)
