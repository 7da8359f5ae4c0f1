"""Lazy registry of drivers: a driver's SDK is imported only when a connection of its kind is used."""

from __future__ import annotations

import importlib
import threading

from drivers.base import ConnectionConfig, Driver

_DRIVERS: dict[str, str] = {
    "simulator": "drivers.simulator:SimulatorDriver",
    "vcenter": "drivers.vmware:VCenterDriver",
    "libvirt": "drivers.libvirt:LibvirtDriver",
}

_open: dict[tuple, Driver] = {}
_lock = threading.Lock()


def kinds() -> tuple[str, ...]:
    return tuple(_DRIVERS)


def driver_class(kind: str) -> type[Driver]:
    try:
        module_name, class_name = _DRIVERS[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown driver kind {kind!r}; known: {', '.join(_DRIVERS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def _key(config: ConnectionConfig) -> tuple:
    return (
        config.kind,
        config.url,
        config.username,
        config.password,
        config.verify_tls,
        config.ca_bundle,
        config.is_lab,
        tuple(sorted((k, repr(v)) for k, v in config.options.items())),
    )


def open_driver(config: ConnectionConfig) -> Driver:
    """The process-wide driver for this configuration, created on first use and reused after
    (one session per worker process and connection). A changed configuration gets a new driver."""
    key = _key(config)
    with _lock:
        driver = _open.get(key)
        if driver is None:
            driver = driver_class(config.kind)(config)
            _open[key] = driver
        return driver


def close_all() -> None:
    """Log every open driver out (worker shutdown)."""
    with _lock:
        drivers = list(_open.values())
        _open.clear()
    for driver in drivers:
        driver.close()
