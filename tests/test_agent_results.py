"""Result records (agent.results, agent.worker): building them, reading what an agent has
done from them, and failed results for bad input (pure: a stand-in runner, no etcd); and
the writer's guarded writes against a real etcd: a record is never replaced by an older
run's result, whoever wrote it and however late."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import pending, results, store
from agent.task_queue import TaskQueue
from agent.worker import Worker, raw_name
from gleam import connection, keys, messages
from gleam.embedded import EtcdServer

LAYOUT = keys.Layout("/g")
KEY = LAYOUT.node_key("web-1")


@dataclass(frozen=True)
class FakeOutcome:
    ok: bool
    result: Any
    error: str | None
    duration_ms: float


class FakeRunner:
    def __init__(self, outcome: FakeOutcome | Exception) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, Any]] = []

    def run(self, name: str, data: messages.JSON) -> FakeOutcome:
        self.calls.append((name, data))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Sink:
    def __init__(self) -> None:
        self.records: dict[str, messages.Result] = {}

    def submit(self, key: str, result: messages.Result) -> None:
        self.records[key] = result


def worker(runner: FakeRunner) -> Worker:
    return Worker(
        TaskQueue(), runner, Sink(), agent_id="web-1", layout=LAYOUT,
        wall_clock=lambda: 1_764_370_201.5, clock=lambda: 0.0,
    )  # fmt: skip


def job(value: bytes, revision: int = 9, skipped: tuple[int, ...] = ()) -> pending.Job:
    return pending.Job(KEY, revision, value, skipped)


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert messages.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert messages.rfc3339(1_764_370_201.5) == "2025-11-28T22:50:01.500Z"


def test_a_successful_run_records_everything_the_contract_names() -> None:
    runner = FakeRunner(FakeOutcome(True, {"n": 1}, None, 12.5))
    record = worker(runner).execute(job(b'{"Name":"a::b","Data":[1,2]}', skipped=(7, 8)))
    assert runner.calls == [("a::b", [1, 2])]
    assert record == messages.Result(
        agent="web-1", key=KEY, revision=9, name="a::b", ok=True, result={"n": 1},
        error=None, started="2025-11-28T22:50:01.500Z", duration_ms=12.5, skipped=[7, 8],
    )  # fmt: skip
    assert messages.decode_result(record.encode()) == record


def test_a_failed_script_records_its_error() -> None:
    runner = FakeRunner(FakeOutcome(False, None, "boom at line 3", 1.0))
    record = worker(runner).execute(job(b'{"Name":"x"}'))
    assert (record.ok, record.error, record.name) == (False, "boom at line 3", "x")


@pytest.mark.parametrize(
    ("value", "name", "error"),
    [
        (b"not json", None, "not JSON"),
        (b"null", None, "null"),
        (b"[1,2]", None, "array"),
        (b'"text"', None, "string"),
        (b"{}", None, 'no "Name"'),
        (b'{"Name": 5}', None, "number"),
        (b'{"Name": "../etc/passwd"}', "../etc/passwd", "invalid"),
        (b"", None, "empty"),
        (b"\xff\xfe", None, "UTF-8"),
        (b'{"Name":"x","Data":"' + b"a" * (messages.MAX_MESSAGE_BYTES + 1) + b'"}', "x", "limit"),
    ],
)
def test_bad_messages_give_failed_results_and_never_reach_the_runner(
    value: bytes, name: str | None, error: str
) -> None:
    runner = FakeRunner(FakeOutcome(True, None, None, 0.0))
    record = worker(runner).execute(job(value))
    assert runner.calls == []
    assert record.ok is False
    assert record.name == name
    assert record.error is not None and error in record.error
    assert record.revision == 9


def test_a_runner_that_raises_still_gives_a_failed_result() -> None:
    record = worker(FakeRunner(RuntimeError("bug"))).execute(job(b'{"Name":"x"}'))
    assert record.ok is False and "bug" in (record.error or "")


def test_a_result_too_large_for_etcd_is_replaced_by_an_error() -> None:
    huge = "x" * (messages.MAX_MESSAGE_BYTES + 10)
    record = worker(FakeRunner(FakeOutcome(True, huge, None, 1.0))).execute(job(b'{"Name":"x"}'))
    assert record.ok is False and record.result is None
    assert "over the" in (record.error or "")


def test_long_errors_are_clipped() -> None:
    outcome = FakeOutcome(False, None, "e" * 100_000, 1.0)
    record = worker(FakeRunner(outcome)).execute(job(b'{"Name":"x"}'))
    assert record.error is not None and len(record.error) < results.MAX_ERROR_CHARS + 100


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_any_bytes_give_a_result_record(value: bytes) -> None:
    record = worker(FakeRunner(FakeOutcome(True, None, None, 0.0))).execute(job(value))
    assert messages.decode_result(record.encode()).revision == 9


def test_raw_name_recovers_a_string_name_only() -> None:
    assert raw_name(b'{"Name": "a/../b"}') == "a/../b"
    assert raw_name(b'{"Name": 1}') is None
    assert raw_name(b"[") is None
    assert raw_name(b'{"Name": "\\ud800x"}') == "\\ud800x"
    assert raw_name(b'{"Name": "t", "Data": ' + b"1" * 5000 + b"}") is None


def test_completions_read_this_agents_records_only() -> None:
    def record(agent: str, target: keys.Target, revision: int, skipped: list[int]) -> bytes:
        return messages.Result(
            agent=agent, key=LAYOUT.task_key(target), revision=revision, name="x", ok=True,
            skipped=skipped,
        ).encode()  # fmt: skip

    node, region = keys.Target.node("web-1"), keys.Target.region("eu")
    records = {
        LAYOUT.result_key("web-1", node): record("web-1", node, 5, [3]),
        LAYOUT.result_key("web-1", region): record("web-1", region, 8, []),
        LAYOUT.result_key("web-2", region): record("web-2", region, 99, []),
        LAYOUT.results_prefix + "web-1/node/broken": b"not json",
        LAYOUT.result_key("web-1", keys.Target.region("us")): json.dumps({"x": 1}).encode(),
    }
    assert results.completions(records, layout=LAYOUT, agent_id="web-1") == {
        LAYOUT.node_key("web-1"): pending.Completed(5, frozenset({3})),
        LAYOUT.region_key("eu"): pending.Completed(8),
    }


def test_next_batch_takes_the_oldest_results_that_fit_in_one_write() -> None:
    items = [(f"k{i}", b"x" * 10) for i in range(5)]
    assert results.next_batch(items, max_results=3, max_bytes=1000) == items[:3]
    assert results.next_batch(items, max_results=10, max_bytes=36) == items[:3]
    assert results.next_batch(items, max_results=10, max_bytes=1000) == items
    # A result larger than the byte limit still goes, on its own.
    big = [("big", b"x" * 5000), *items]
    assert results.next_batch(big, max_results=10, max_bytes=1000) == big[:1]
    assert results.next_batch([], max_results=10, max_bytes=1000) == []


def record(revision: int) -> messages.Result:
    return messages.Result(agent="web-1", key=KEY, revision=revision, name="x", ok=True)


def test_a_result_supersedes_only_a_missing_broken_or_older_record() -> None:
    assert results.supersedes(5, None)
    assert results.supersedes(5, b"not json")
    assert results.supersedes(5, record(4).encode())
    assert not results.supersedes(5, record(5).encode()), "our own write, landed after all"
    assert not results.supersedes(5, record(6).encode()), "a newer run's record"


class LostAnswers(store.Store):
    """A real etcd whose first `lost` answers to guarded writes never arrive: the write
    is applied, and the writer is told the request failed (a timeout)."""

    def __init__(self, endpoint: str, lost: int) -> None:
        super().__init__(connection.make_settings(endpoint))
        self.lost = lost

    def put_guarded(self, items: Sequence[store.Guarded]) -> store.TxnOutcome:
        outcome = super().put_guarded(items)
        if self.lost > 0:
            self.lost -= 1
            raise store.Unavailable("StatusCode.DEADLINE_EXCEEDED: the answer was lost")
        return outcome


def write_all(writer: results.ResultWriter, submitted: dict[str, int]) -> None:
    for key, revision in submitted.items():
        writer.submit(key, record(revision))
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    assert writer.close(timeout=20) == []
    thread.join(10)


def stored(etcd: Any, key: str) -> int:
    return messages.decode_result(etcd.get(key)[0]).revision


def test_the_writer_never_replaces_a_newer_record_and_replaces_older_ones(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    """One batch over records written by someone else (a previous process of this agent,
    or a late write): absent and older ones are written, a newer one is kept."""
    absent, older, newer = (layout.results_prefix + f"web-1/node/{n}" for n in "abc")
    etcd.put(older, record(2).encode())
    etcd.put(newer, record(9).encode())
    writer = results.ResultWriter(store.Store(connection.make_settings(etcd_server.endpoint)))
    write_all(writer, {absent: 5, older: 5, newer: 5})
    assert (stored(etcd, absent), stored(etcd, older), stored(etcd, newer)) == (5, 5, 9)
    assert (writer.written, writer.superseded) == (2, 1)


def test_a_stale_writer_cannot_undo_a_newer_record(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    """The dead process's writer (guarded by what it last wrote) against its successor's
    newer record: its older result fails its compare and is dropped."""
    key = layout.results_prefix + "web-1/node/a"
    settings = connection.make_settings(etcd_server.endpoint)
    dead = results.ResultWriter(store.Store(settings))
    write_all(dead, {key: 5})
    write_all(results.ResultWriter(store.Store(settings)), {key: 9})
    late = results.ResultWriter(store.Store(settings))
    late._seen = dict(dead._seen)  # the dead writer's guard, replayed
    write_all(late, {key: 7})
    assert stored(etcd, key) == 9
    assert (late.written, late.superseded) == (0, 1)


def test_a_write_whose_answer_was_lost_is_not_written_twice(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    key = layout.results_prefix + "web-1/node/a"
    writer = results.ResultWriter(LostAnswers(etcd_server.endpoint, lost=1))
    write_all(writer, {key: 5})
    value, meta = etcd.get(key)
    assert messages.decode_result(value).revision == 5
    assert int(meta.version) == 1, "one write, not two"
    assert (writer.written, writer.superseded) == (0, 1)
    # The writer learnt the record's revision from reading it: its next write is guarded
    # by that and goes through at the first attempt.
    assert writer._seen == {key: int(meta.mod_revision)}
