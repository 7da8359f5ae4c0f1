"""End-to-end fixtures: the real portal (Daphne + a Celery worker on Redis) against the test
database, and Debian's chromium driven by Playwright. If a piece cannot start, the test fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url_host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the portal exited early:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection((url_host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the portal did not answer on {port} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def live_portal(transactional_db, tmp_path):
    """Start Daphne and a worker on the test database; yields the base URL."""
    db = settings.DATABASES["default"]
    assert db["ENGINE"].endswith("postgresql"), "end-to-end tests run on PostgreSQL"
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "CELERY_BROKER_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "CELERY_QUEUE": f"e2e-{tag}",
        "CHANNEL_PREFIX": f"e2e-{tag}",
        "PORTAL_DATA_DIR": str(tmp_path / "data"),
        "PORTAL_HEARTBEAT_S": "0.5",
        "PORTAL_PROGRESS_INTERVAL_S": "0.2",
        "DEBUG": "1",
    }
    env.pop("CHANNEL_LAYER", None)
    # The portal's processes share the credentials key, as a deployment's do.
    from cryptography.fernet import Fernet

    from migrations_app.secrets import key_from

    env["PORTAL_FIELD_KEY"] = key_from("PORTAL_FIELD_KEY", "field.key", Fernet.generate_key).decode()
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    port = _free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("web", "worker")}
    commands = {
        "web": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "portal.asgi:application"],
        "worker": [sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", env["CELERY_QUEUE"], "--pool",
                   "threads", "--concurrency", "2", "--without-mingle", "--without-gossip", "--loglevel", "INFO"],
    }
    procs = {}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[name].open("w"),
                                           stderr=subprocess.STDOUT)
        _wait_http("127.0.0.1", port, procs["web"], logs["web"])
        deadline = time.monotonic() + 30
        while "ready." not in logs["worker"].read_text():
            if procs["worker"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{logs['worker'].read_text()[-3000:]}")
            time.sleep(0.1)
        yield {"url": f"http://127.0.0.1:{port}", "logs": logs, "procs": procs, "redis_url": env["REDIS_URL"]}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the test's own ORM calls are still
    # plain synchronous code (Playwright's documented setting for Django).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `bash lab/bootstrap.sh chromium` installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def login(browser, live_portal):
    def _login(username: str, password: str):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15000)
        page.goto(live_portal["url"] + "/login/")
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_selector("#live-state.on")
        return page

    return _login


@pytest.fixture
def api(login, live_portal):
    """Call the portal's JSON API as a logged-in user (session cookie + CSRF token)."""

    def _api(username: str, password: str):
        page = login(username, password)
        token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")

        def post(path: str, payload: dict):
            response = page.request.post(live_portal["url"] + path, data=payload,
                                         headers={"X-CSRFToken": token, "Referer": live_portal["url"] + "/"})
            assert response.ok, (path, response.status, response.text())
            return response.json()

        return post

    return _api

