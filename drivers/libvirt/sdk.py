"""libvirt-python loaded lazily, the process-wide event loop, and libvirt's errors as the portal's.

Nothing in the package imports the SDK at module level; the other modules reach it as
``sdk.libvirt`` once ``load_sdk()`` has bound it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from drivers.base import DriverError, MigrationFailed, Unsupported
from drivers.libvirt import jobs

log = logging.getLogger(__name__)

# The SDK, bound by load_sdk() when the first driver is made: the registry and the test suite
# read the driver's capabilities on machines where libvirt-python is not installed (yet).
libvirt: Any = None


def load_sdk() -> Any:
    """Import libvirt-python (once) and return it. Raises Unsupported when it is missing."""
    global libvirt
    if libvirt is None:
        try:
            import libvirt as sdk
        except ImportError as err:
            raise Unsupported(
                "libvirt-python is not installed; run lab/kvm/lab.sh install or pip install -r requirements-lab.txt",
                hypervisor_message=str(err),
            ) from err
        libvirt = sdk
    return libvirt


# --------------------------------------------------------------------------------------------
# Process-wide event loop
# --------------------------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_started = False


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; they reach us as exceptions anyway."""


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            log.error("libvirt event loop iteration failed")
            time.sleep(0.5)  # do not spin if the loop keeps failing


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread, once per process.

    It must exist before any connection is opened: connections opened earlier never deliver
    events and cannot use keep-alive.
    """
    global _loop_started
    load_sdk()
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-event-loop", daemon=True).start()
        _loop_started = True


# --------------------------------------------------------------------------------------------
# Errors: one place turns libvirt's into the portal's
# --------------------------------------------------------------------------------------------


def translate(err: libvirt.libvirtError, message: str, default: type[DriverError]) -> DriverError:
    said = err.get_error_message() or str(err)
    cls = jobs.classify_error(err.get_error_code() or 0, err.get_error_domain() or 0, said, default)
    return cls(message, hypervisor_message=said, code=f"libvirt:{err.get_error_code()}")


@contextlib.contextmanager
def errors(message: str, default: type[DriverError] = MigrationFailed) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as err:
        raise translate(err, message, default) from err


def error_code(err: libvirt.libvirtError) -> int:
    return err.get_error_code() or 0
