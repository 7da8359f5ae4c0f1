"""Talking to one vCenter: where it is (endpoint, TLS), the SOAP stub that counts round trips,
and the login, again after vCenter expired the session."""

from __future__ import annotations

import io
import logging
import queue
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pyVmomi import SoapStubAdapter, vim, vmodl
from pyVmomi.SoapAdapter import SoapResponseDeserializer

from drivers.base import ConnectionConfig, ConnectionFailed
from drivers.vmware.faults import _CONNECTION_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")

# The wire API version the driver speaks. vSphere 6.5 has every call used here and every
# supported vCenter (6.5 to 8.x, and vcsim) serves it; pinning it saves a version probe.
DEFAULT_API_VERSION = "vim25/6.5"
_CHUNK = 1 << 20  # bytes read at a time from a streamed answer


@dataclass(frozen=True)
class Endpoint:
    """Where the SDK lives, with the credentials to use. The password stays out of the repr."""

    scheme: str
    host: str
    port: int
    path: str
    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def parse_endpoint(config: ConnectionConfig) -> Endpoint:
    """Read ``config.url`` (``https://vcenter.example.com/sdk``; a bare host name means that) and
    enforce the TLS rules: plain http or unverified TLS only for a lab connection. Credentials
    embedded in the URL (the lab's vcsim prints them so) are used when the config has none."""
    raw = config.url.strip()
    if "://" not in raw:
        raw = f"https://{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConnectionFailed(f"not a vCenter URL: {parts.scheme}://{parts.hostname or ''}", code="bad-url")
    if not config.is_lab and (parts.scheme == "http" or not config.verify_tls):
        raise ConnectionFailed(
            "plain http and unverified TLS are allowed only for lab connections; "
            "give the vCenter's CA certificate as ca_bundle instead",
            code="insecure-config",
        )
    return Endpoint(
        scheme=parts.scheme,
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path=parts.path if parts.path not in ("", "/") else "/sdk",
        username=config.username or unquote(parts.username or ""),
        password=config.password or unquote(parts.password or ""),
    )


def ssl_context(config: ConnectionConfig) -> ssl.SSLContext:
    """The TLS context: verified against ``ca_bundle`` (PEM text or a file path) or the system
    store; unverified only for a lab connection that asked for it (``verify_tls`` False)."""
    if not config.verify_tls and config.is_lab:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    bundle = config.ca_bundle.strip()
    if not bundle:
        return ssl.create_default_context()
    if "-----BEGIN" in bundle:
        return ssl.create_default_context(cadata=bundle)
    return ssl.create_default_context(cafile=bundle)


class _CountingStub(SoapStubAdapter):
    """pyvmomi's SOAP stub, counting requests (the benchmarks report them)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.round_trips = 0
        self._count_lock = threading.Lock()

    def InvokeMethod(self, mo, info, args, outerStub=None):  # noqa: N802 - pyvmomi's name
        with self._count_lock:
            self.round_trips += 1
        return super().InvokeMethod(mo, info, args, outerStub)

    def invoke_streamed(self, mo: Any, method: str, args: list, sink: Callable[[bytes], None]) -> None:
        """Call ``method`` on ``mo`` and hand the SOAP answer to ``sink`` undecoded, chunk by chunk
        as it arrives, for the one answer too large for pyvmomi's decoder (the VMs' device lists).
        A fault is decoded and raised as InvokeMethod raises it."""
        info = mo._GetMethodInfo(method)
        headers = {"Cookie": self.cookie, "SOAPAction": self.versionId, "Content-Type": "text/xml; charset=UTF-8"}
        body = self.SerializeRequest(mo, info, args)
        with self._count_lock:
            self.round_trips += 1
        conn = self.GetConnection()
        try:
            conn.request("POST", self.path, body, headers)
            resp = conn.getresponse()
            if resp.status == 200:
                while chunk := resp.read(_CHUNK):
                    sink(chunk)
                answer = b""
            else:
                answer = resp.read()
        except BaseException:
            # A broken connection, or a sink that refused the answer half-read: never reuse it.
            conn.close()
            self.DropConnections()
            raise
        self.ReturnConnection(conn)
        if resp.status == 500:
            raise SoapResponseDeserializer(self).Deserialize(io.BytesIO(answer), info.result)
        if resp.status != 200:
            raise HTTPException(f"{resp.status} {resp.reason}")


@dataclass
class _Session:
    """One login. Its property collectors and container view die with it."""

    content: Any  # vim.ServiceInstanceContent
    view: Any = None  # container view over the inventory, created on first inventory()
    idle_collectors: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


def open_stub(endpoint: Endpoint, config: ConnectionConfig, api_version: str, http_timeout_s: float) -> _CountingStub:
    """The SOAP stub for the endpoint (a negative port is pyvmomi's way of saying plain http)."""
    return _CountingStub(
        host=endpoint.host,
        port=endpoint.port if endpoint.scheme == "https" else -endpoint.port,
        path=endpoint.path,
        version=api_version,
        sslContext=ssl_context(config) if endpoint.scheme == "https" else None,
        httpConnectionTimeout=http_timeout_s,
    )


def log_in(stub: _CountingStub, endpoint: Endpoint, expired: _Session | None) -> _Session:
    """A new login; after an ``expired`` one, on the service content that session already read."""
    content = expired.content if expired else vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
    content.sessionManager.Login(endpoint.username, endpoint.password)
    log.info("logged in to %s as %s%s", endpoint, endpoint.username, " again" if expired else "")
    return _Session(content)


def run_in_session(session: _Session, login: Callable[[_Session], _Session], operation: Callable[[_Session], T]) -> T:
    """Run one operation in the session; if vCenter says the session expired, log in again
    and run it once more. A call refused with NotAuthenticated did not run, so repeating it
    is safe; an operation of several calls must be safe to start over (reads, a task wait)."""
    try:
        return operation(session)
    except vim.fault.NotAuthenticated:
        log.info("vCenter session expired; logging in again")
        return operation(login(session))


def log_out(session: _Session, stub: _CountingStub, endpoint: Endpoint) -> None:
    """End the login and drop the stub's connections; a failed logout is only logged."""
    try:
        session.content.sessionManager.Logout()  # also frees its views and collectors
    except (vmodl.MethodFault, *_CONNECTION_ERRORS) as exc:
        log.warning("logout from %s failed: %s", endpoint, exc)
    stub.DropConnections()
