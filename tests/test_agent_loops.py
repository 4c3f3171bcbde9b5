"""The agent's registration and result-writer loops in-process, against a real etcd:
driven through their stop/close methods, as the daemon drives them."""

from __future__ import annotations

import threading
from typing import Any

from agent import store
from agent.registration import Registrar
from agent.results import ResultWriter
from gleam import connection, keys, messages
from gleam.embedded import EtcdServer, free_port
from gleam.lease import refresh_interval
from tests.support import wait_until

INFO = messages.AgentInfo(
    id="loop", hostname="h", pid=1, regions=["eu"], version="0", started="", script_dir="/s"
)


def result(key: str, revision: int) -> messages.Result:
    return messages.Result(agent="loop", key=key, revision=revision, name="x", ok=True)


def test_registrar_registers_keeps_alive_and_revokes_on_stop(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    key = layout.info_key("loop")
    registrar = Registrar(
        store.Store(connection.make_settings(etcd_server.endpoint)), key=key, info=INFO, ttl=2
    )
    thread = threading.Thread(target=registrar.run, daemon=True)
    thread.start()
    assert registrar.registered.wait(10)
    value, meta = etcd.get(key)
    assert messages.decode_agent_info(value) == INFO
    lease = meta.lease_id
    # Four refreshes, a third of a TTL apart, outlast the TTL: the lease is kept alive.
    wait_until(lambda: registrar.refreshes >= 4, timeout=20, what="four lease refreshes")
    assert etcd.get_lease_info(lease).TTL > 0
    assert etcd.get(key)[1].lease_id == lease
    registrar.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert etcd.get(key)[0] is None, "stop revokes the lease"
    assert registrar.registrations == 1


def test_registrar_puts_back_a_record_deleted_while_its_lease_lives(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    key = layout.info_key("loop")
    registrar = Registrar(
        store.Store(connection.make_settings(etcd_server.endpoint)), key=key, info=INFO, ttl=2
    )
    thread = threading.Thread(target=registrar.run, daemon=True)
    thread.start()
    try:
        assert registrar.registered.wait(10)
        lease = etcd.get(key)[1].lease_id
        etcd.delete(key)
        wait_until(lambda: etcd.get(key)[0] is not None, what="the record back")
        assert etcd.get(key)[1].lease_id == lease
        assert registrar.registrations == 2
    finally:
        registrar.stop()
        thread.join(10)


def test_refresh_interval_is_a_third_of_the_ttl() -> None:
    assert refresh_interval(9) == 3
    assert refresh_interval(1) == 0.5


def test_result_writer_writes_in_order_and_keeps_only_the_newest_per_key(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    writer = ResultWriter(store.Store(connection.make_settings(etcd_server.endpoint)))
    a, b = layout.results_prefix + "loop/node/a", layout.results_prefix + "loop/node/b"
    # Submitted before the thread runs: a's first result is replaced by its second.
    writer.submit(a, result(a, 1))
    writer.submit(b, result(b, 2))
    writer.submit(a, result(a, 3))
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    assert writer.close(timeout=10) == []
    thread.join(10)
    assert messages.decode_result(etcd.get(a)[0]).revision == 3
    assert messages.decode_result(etcd.get(b)[0]).revision == 2
    assert writer.written == 2


def test_result_writer_shutdown_is_bounded_when_etcd_is_unreachable() -> None:
    dead = connection.make_settings(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    writer = ResultWriter(store.Store(dead))
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    writer.submit("/g/result/loop/node/a", result("/g/node/a", 1))
    assert writer.close(timeout=1.0) == ["/g/result/loop/node/a"]
    thread.join(10)
    assert not thread.is_alive()


def test_result_writer_writes_a_large_backlog_in_batches(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    writer = ResultWriter(store.Store(connection.make_settings(etcd_server.endpoint)))
    names = [layout.results_prefix + f"loop/region/r{i}" for i in range(300)]
    for i, key in enumerate(names):
        writer.submit(key, result(key, i + 1))
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    assert writer.close(timeout=30) == []
    thread.join(10)
    assert writer.written == 300
    stored = {
        meta.key.decode(): messages.decode_result(value).revision
        for value, meta in etcd.get_prefix(layout.results_prefix)
    }
    assert stored == {key: i + 1 for i, key in enumerate(names)}
