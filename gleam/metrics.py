"""Prometheus metrics, switched on by `-metrics HOST:PORT`.

prometheus_client is imported only here and only when the flag is given (`load`), so an
agent without `-metrics` does not carry it. Each process builds its own registry (no
global state: tests run several in one process) with the process collector
(`process_resident_memory_bytes`, CPU, open files) beside Gleam's own metrics.

No label ever holds an agent id, a commit, a key or a function name: each of those grows
with the fleet, and a time series per value would make every Prometheus scrape larger as
the fleet grows (Salt's rule). Per-agent and per-key detail is in etcd, where
`gleam-client status` shows it.
"""

from __future__ import annotations

import ipaddress
import re
from types import ModuleType
from typing import TYPE_CHECKING

from gleam import flags

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

FLAG = flags.Flag(
    "metrics",
    "serve Prometheus metrics at http://HOST:PORT/metrics and health at /healthz "
    "(e.g. 127.0.0.1:9271; :PORT listens on every interface)",
    metavar="HOST:PORT",
)

# Task and pass durations: from a millisecond Lua function to the 60 s task limit, and
# from an incremental pass to a slow full apply.
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ListenError(Exception):
    """The -metrics address cannot be listened on; the text says which and why."""


def parse_address(raw: str | None) -> tuple[str, int] | None:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (every interface) from -metrics; None when the
    flag is not given. Raises FlagError naming the flag. Port 0 picks a free port (the
    log says which)."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise flags.FlagError(f"-metrics: {raw!r} is not HOST:PORT (e.g. 127.0.0.1:9271)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise flags.FlagError(f"-metrics: {raw!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise flags.FlagError(f"-metrics: {raw!r}: write an IPv6 address in brackets, [::1]:9271")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise flags.FlagError(f"-metrics: {raw!r}: the port must be a number from 0 to 65535")
    if host and ":" not in host and not _HOST.fullmatch(host):
        raise flags.FlagError(f"-metrics: {raw!r}: {host!r} is not a host name or address")
    return host, int(port_text)


def load() -> ModuleType:
    """prometheus_client, imported now; FlagError when it is not installed."""
    try:
        import prometheus_client
    except ImportError:
        raise flags.FlagError(
            "-metrics: the prometheus_client package is not installed "
            "(pip install prometheus_client)"
        ) from None
    return prometheus_client


def new_registry() -> CollectorRegistry:
    """A registry of this process's own, with the process and platform collectors."""
    prom = load()
    # No `<name>_created` series beside each counter: they double the page for nothing
    # the alert rules use (a process-wide switch; this process only has this registry).
    prom.disable_created_metrics()
    registry: CollectorRegistry = prom.CollectorRegistry(auto_describe=True)
    prom.ProcessCollector(registry=registry)
    prom.PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus' text format, and its content type."""
    prom = load()
    return prom.generate_latest(registry), str(prom.CONTENT_TYPE_LATEST)
