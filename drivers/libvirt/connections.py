"""The libvirt hosts one connection config names, and one open connection to each of them."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from drivers.base import ConnectionFailed
from drivers.libvirt import sdk
from drivers.libvirt.sdk import errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str
    migration_uri: str
    cluster: str


def parse_hosts(options: Mapping[str, object]) -> dict[str, HostConfig]:
    raw = options.get("hosts")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError("libvirt options need a non-empty 'hosts' list")
    hosts: dict[str, HostConfig] = {}
    for item in raw:
        if not isinstance(item, Mapping) or not item.get("name") or not item.get("uri"):
            raise ValueError(f"each libvirt host needs 'name' and 'uri': {item!r}")
        name = str(item["name"])
        if name in hosts or "/" in name:
            raise ValueError(f"libvirt host names must be unique and contain no '/': {name!r}")
        hosts[name] = HostConfig(
            name=name,
            uri=str(item["uri"]),
            migration_uri=str(item.get("migration_uri") or ""),
            cluster=str(item.get("cluster") or name),
        )
    return hosts


class Connections:
    """One connection per host, opened on first use, reopened when it died (keep-alive)."""

    def __init__(self, hosts: Mapping[str, HostConfig], interval: int, count: int):
        self._hosts = hosts
        self._interval = interval
        self._count = count
        self._conns: dict[str, sdk.libvirt.virConnect] = {}
        self._locks = {name: threading.Lock() for name in hosts}

    def get(self, name: str) -> sdk.libvirt.virConnect:
        host = self._hosts[name]
        with self._locks[name]:
            conn = self._conns.get(name)
            if conn is not None:
                try:
                    if conn.isAlive():
                        return conn
                except sdk.libvirt.libvirtError:
                    pass  # as dead as isAlive() == 0: reopen below
                log.warning("connection to %s died; reconnecting", name)
                self._forget(name)
            with errors(f"cannot connect to libvirt host {name}", ConnectionFailed):
                conn = sdk.libvirt.open(host.uri)
            try:
                conn.setKeepAlive(self._interval, self._count)
                conn.registerCloseCallback(self._closed, name)
            except sdk.libvirt.libvirtError as err:
                log.warning("no keep-alive on %s: %s", name, err.get_error_message())
            self._conns[name] = conn
            return conn

    def _closed(self, conn: sdk.libvirt.virConnect, reason: int, name: str) -> None:
        """Close callback (event loop thread): drop the dead connection; the next get() reopens."""
        log.warning("libvirt connection to %s closed (reason %s)", name, reason)
        if self._conns.get(name) is conn:
            self._conns.pop(name, None)

    def _forget(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is None:
            return
        with contextlib.suppress(sdk.libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(sdk.libvirt.libvirtError):
            conn.close()

    def close(self) -> None:
        for name in list(self._conns):
            with self._locks[name]:
                self._forget(name)
