"""Fixtures the notification tests share: users with e-mail addresses, and a real local HTTP
server standing for a chat tool's webhook endpoint."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@pytest.fixture
def people(users):
    for user in users.values():
        user.email = f"{user.username}@example.test"
        user.save(update_fields=["email"])
    return users


class _Receiver(BaseHTTPRequestHandler):
    """A chat tool's endpoint: verifies the signature the way the README tells receivers to."""

    answer = 204
    received: list[dict] = []
    secret = ""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        timestamp = self.headers["X-Portal-Timestamp"]
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        self.received.append({
            "valid": hmac.compare_digest(expected, self.headers["X-Portal-Signature"]),
            "fresh": abs(time.time() - int(timestamp)) < 300,
            "json": json.loads(body),
            "headers": {k: self.headers[k] for k in ("X-Portal-Timestamp", "X-Portal-Signature")},
        })
        self.send_response(self.answer)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.received, _Receiver.answer, _Receiver.secret = [], 204, "s3cret-for-chat"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _Receiver, f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()
