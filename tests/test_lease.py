"""The lease session (gleam/lease.py) on the in-memory etcd: the agent's registration
drives it step by step, the apply lock lets it refresh from its own thread."""

from __future__ import annotations

import pytest

from gleam import etcdapi, lease
from gleam.fake_etcd import FakeEtcd


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_refreshed_lease_outlives_its_ttl_and_a_revoked_one_takes_its_keys() -> None:
    clock = Clock()
    fake = FakeEtcd(clock=clock)
    session = lease.LeaseSession(fake, ttl=9)
    lease_id, granted = session.grant()
    assert (session.id, granted, session.interval) == (lease_id, 9, 3.0)
    fake.txn([], [etcdapi.Put("/k", b"v", lease=lease_id)])
    for _ in range(5):
        clock.now += session.interval
        assert session.refresh()
    assert etcdapi.get_one(fake, "/k") is not None
    session.revoke()
    assert session.id == 0 and etcdapi.get_one(fake, "/k") is None


def test_a_lease_that_expired_is_reported_gone_once() -> None:
    clock = Clock()
    fake = FakeEtcd(clock=clock)
    session = lease.LeaseSession(fake, ttl=3)
    session.grant()
    clock.now += 4
    assert not session.refresh()
    assert session.id == 0


def test_close_never_raises_and_ends_the_lease() -> None:
    fake = FakeEtcd()
    session = lease.LeaseSession(fake, ttl=30)
    lease_id = session.open()
    fake.txn([], [etcdapi.Put("/k", b"v", lease=lease_id)])
    session.close()
    assert etcdapi.get_one(fake, "/k") is None

    def down(call: str) -> None:
        raise etcdapi.EtcdError(f"UNAVAILABLE: {call}")

    other = lease.LeaseSession(fake, ttl=30)
    other.open()
    fake.fail = down
    other.close()  # logged, not raised: the TTL ends the lease anyway
    with pytest.raises(etcdapi.EtcdError):
        other.grant()


@pytest.mark.parametrize(("ttl", "interval"), [(1, 0.5), (3, 1.0), (30, 10.0)])
def test_refreshes_come_three_times_per_ttl_and_never_faster_than_twice_a_second(
    ttl: int, interval: float
) -> None:
    assert lease.refresh_interval(ttl) == interval
