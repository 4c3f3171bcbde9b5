"""Gleam behind `etcd grpc-proxy`: agents, a reconcile with --wait and gleam-client -wait
all talk to etcd only through the proxy, unchanged. Real etcd, real proxy, real agent
subprocesses."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gleam import connection, keys
from gleam.embedded import EtcdGrpcProxy, EtcdServer
from reconciler import sync
from tests.agent_support import StartAgent, wait_registered
from tests.reconcile_support import OpsRepo
from tests.support import ROOT, client_for, connected, wait_until

pytestmark = pytest.mark.slow

LAYOUT = keys.Layout("/proxied")


@pytest.fixture
def proxy(private_etcd: EtcdServer, tmp_path: Path) -> Iterator[EtcdGrpcProxy]:
    started = EtcdGrpcProxy(private_etcd.endpoint, data_dir=str(tmp_path / "proxy")).start()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def proxied(proxy: EtcdGrpcProxy) -> Iterator[Any]:
    with connected(proxy.endpoint) as client:
        yield client


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def outlives(client: Any, lease_id: int, ttl: float) -> Any:
    """A predicate true once the lease has lived through twice its TTL: without a
    refresh it would have expired by then."""
    deadline = time.monotonic() + 2 * ttl

    def check() -> bool:
        alive = int(client.get_lease_info(lease_id).TTL) > 0
        assert alive, f"lease {lease_id} expired: it was not refreshed"
        return time.monotonic() > deadline

    return check


def test_a_lease_refresh_through_the_proxy_keeps_the_lease(proxied: Any) -> None:
    """pyetcd's own refresh_lease fails through the proxy ("context canceled")."""
    lease = proxied.lease(3)
    for _ in range(3):
        assert connection.refresh_lease(proxied, lease.id) == 3
    proxied.revoke_lease(lease.id)
    assert connection.refresh_lease(proxied, lease.id) <= 0


def test_the_apply_lock_keeps_its_lease_through_the_proxy(proxied: Any) -> None:
    lock = sync.Store.over(proxied, LAYOUT).lock(ttl=2)
    lock.acquire(timeout=5)
    try:
        lease_id = lock.lease_id
        wait_until(outlives(proxied, lease_id, 2), timeout=20, what="the lock's lease refreshed")
        assert lock.held()
    finally:
        lock.release()
    assert proxied.get(LAYOUT.lock_key)[0] is None


def test_agents_a_reconcile_and_the_client_work_through_the_proxy(
    proxy: EtcdGrpcProxy,
    proxied: Any,
    private_etcd: EtcdServer,
    start_agent: StartAgent,
    tmp_path: Path,
) -> None:
    for name in ("web-1", "web-2"):
        start_agent(proxy.endpoint, "-id", name, "-region", "eu", "-ttl", "3", layout=LAYOUT)
    _info, lease_id = wait_registered(proxied, LAYOUT, "web-1")
    wait_registered(proxied, LAYOUT, "web-2")

    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", data="data:\n  greeting: hello from git\n")
    repo.region("eu", data="data:\n  greeting: hello region\n")
    repo.commit()
    applied = run(
        "reconciler.cli",
        "-etcd", proxy.endpoint, "-prefix", LAYOUT.prefix, "--repo", str(repo.path),
        "--once", "--wait", "60",
    )  # fmt: skip
    assert applied.returncode == 0, applied.stdout + applied.stderr

    sent = run(
        "gleam.cli",
        "-etcd", proxy.endpoint, "-prefix", LAYOUT.prefix,
        "-target", "web-2", "-fn", "print", "-data", '{"by": "hand"}', "-wait", "60",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr

    # The agents' registration leases are kept alive through the proxy (TTL 3 s).
    wait_until(outlives(proxied, lease_id, 3), timeout=20, what="web-1's lease refreshed")
    direct = client_for(private_etcd.endpoint)
    try:
        results = direct.get_prefix_response(LAYOUT.results_prefix, count_only=True).count
    finally:
        direct.close()
    assert results >= 3  # web-1's node task, the region task on both, web-2's by hand
