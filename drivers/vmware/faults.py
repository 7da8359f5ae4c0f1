"""vCenter faults and connection errors become the portal's domain errors, in one place.

``domain_error`` maps a fault, keeping vCenter's own message as ``hypervisor_message``;
``_translated`` applies it (and the connection/TLS errors) at the driver's public methods."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from http.client import HTTPException
from typing import TYPE_CHECKING, Any, TypeVar
from xml.parsers.expat import ExpatError

from pyVmomi import vim, vmodl

from drivers.base import (
    AuthenticationFailed,
    ConnectionFailed,
    DriverError,
    InsufficientResources,
    InvalidState,
    MigrationCancelled,
    NotFound,
    PermissionDenied,
    Unsupported,
)

if TYPE_CHECKING:
    from drivers.vmware.driver import VCenterDriver

T = TypeVar("T")
_CONNECTION_ERRORS = (OSError, HTTPException, ExpatError)  # ssl.SSLError is an OSError


def fault_text(fault: BaseException) -> str:
    """vCenter's own words for a fault: its localized message, else its fault messages."""
    msg = getattr(fault, "msg", "") or ""
    if not msg:
        msg = "; ".join(m.message for m in getattr(fault, "faultMessage", None) or () if m.message)
    return msg or getattr(fault, "_wsdlName", type(fault).__name__)


_KIND_WORDS = {"VirtualMachine": "VM", "HostSystem": "host", "Datastore": "datastore", "Task": "task"}


def domain_error(
    fault: vmodl.MethodFault, *, default: type[DriverError] = DriverError, context: str = ""
) -> DriverError:
    """The one place where vCenter faults become the portal's errors.

    ``default`` is the error for anything not listed (reads: DriverError; a failed relocation
    task: MigrationFailed). ``context`` says what the driver was doing."""
    text = fault_text(fault)
    code = getattr(fault, "_wsdlName", type(fault).__name__)
    prefix = f"{context}: " if context else ""
    if isinstance(fault, vim.fault.InvalidLogin):
        return AuthenticationFailed(
            f"{prefix}vCenter refused the user name or password", hypervisor_message=text, code=code
        )
    if isinstance(fault, vim.fault.NotAuthenticated):
        return AuthenticationFailed(
            f"{prefix}the vCenter session is no longer valid", hypervisor_message=text, code=code
        )
    if isinstance(fault, vim.fault.NoPermission):
        return PermissionDenied(
            f"{prefix}the vCenter account lacks privilege {fault.privilegeId or '?'}",
            hypervisor_message=text,
            code=code,
        )
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
        obj = fault.obj
        what = _KIND_WORDS.get(getattr(obj, "_wsdlName", ""), "object")
        ref = getattr(obj, "_moId", "?")
        return NotFound(f"{prefix}{what} {ref} does not exist in vCenter", hypervisor_message=text, code=code)
    if isinstance(fault, (vim.fault.InsufficientResourcesFault, vim.fault.NoDiskSpace)):
        return InsufficientResources(f"{prefix}{text}", hypervisor_message=text, code=code)
    if isinstance(fault, vim.fault.InvalidState):
        return InvalidState(f"{prefix}{text}", hypervisor_message=text, code=code)
    if isinstance(fault, vmodl.fault.RequestCanceled):
        return MigrationCancelled(f"{prefix}vCenter cancelled the task", hypervisor_message=text, code=code)
    if isinstance(fault, (vmodl.fault.MethodNotFound, vmodl.fault.NotImplemented, vmodl.fault.NotSupported)):
        return Unsupported(f"{prefix}this vCenter does not support the call", hypervisor_message=text, code=code)
    return default(f"{prefix}{text}", hypervisor_message=text, code=code)


def translate(exc: BaseException, *, endpoint: Any, default: type[DriverError] = DriverError,
              context: str = "") -> DriverError | None:
    """The portal's error for what a call to vCenter at ``endpoint`` raised: a DriverError as it
    is, a fault through ``domain_error``, a connection or TLS error as ConnectionFailed; None for
    anything else (the portal's own bug, left to propagate)."""
    if isinstance(exc, DriverError):
        return exc
    if isinstance(exc, vmodl.MethodFault):
        return domain_error(exc, default=default, context=context)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectionFailed(
            f"the certificate of {endpoint.host} is not trusted ({exc.verify_message}); give its CA as ca_bundle",
            code="tls-verify",
        )
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionFailed(f"cannot talk to vCenter at {endpoint}: {exc.__class__.__name__}: {exc}",
                                code="connection")
    return None


def _translated(default: type[DriverError] = DriverError, context: str = ""):
    """Decorator: vCenter faults and connection errors leave public methods as DriverErrors."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def run(self: VCenterDriver, *args: Any, **kwargs: Any) -> T:
            try:
                return method(self, *args, **kwargs)
            except DriverError:
                raise
            except (vmodl.MethodFault, *_CONNECTION_ERRORS) as exc:
                raise translate(exc, endpoint=self.endpoint, default=default, context=context) from None

        return run

    return wrap
