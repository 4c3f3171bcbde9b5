"""gleam.client.send_tasks, the hand-sent task's write: guarded by the keys' mod_revisions,
so a timed-out write sent again is applied at most once, never as two revisions. Against
a real etcd whose answers are lost the way a network loses them (the write applied or
not, the client told it timed out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from pyetcd import exceptions as pyetcd_exceptions

from gleam import cli, client, connection, keys, messages

TASK = messages.Task("echo", {"n": 1})


class Lossy:
    """A real pyetcd client whose guarded writes (transactions with compares) go as
    `plan` says, one step per attempt: "applied" (etcd applied it, the answer was lost),
    "dropped" (it never reached etcd), "theirs" (someone else writes the keys first, then
    ours goes through as usual). Every other call passes straight through."""

    def __init__(self, etcd: Any, plan: Sequence[str]) -> None:
        self._etcd = etcd
        self._plan = list(plan)
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._etcd, name)

    def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        if not compare:
            return self._etcd.transaction(compare=compare, success=success, failure=failure)
        self.attempts += 1
        step = self._plan.pop(0) if self._plan else "ok"
        if step == "applied":
            self._etcd.transaction(compare=compare, success=success, failure=failure)
            raise pyetcd_exceptions.ConnectionTimeoutError()
        if step == "dropped":
            raise pyetcd_exceptions.ConnectionTimeoutError()
        if step == "theirs":
            for op in success:
                self._etcd.put(op.key, b"theirs")
        return self._etcd.transaction(compare=compare, success=success, failure=failure)


def state(etcd: Any, key: str) -> tuple[bytes | None, int, int]:
    """(value, mod_revision, version) of a key."""
    value, meta = etcd.get(key)
    return (value, int(meta.mod_revision), int(meta.version)) if meta else (None, 0, 0)


def test_a_send_writes_every_key_once_at_one_revision(etcd: Any, layout: keys.Layout) -> None:
    targets = [keys.Target.node("a"), keys.Target.region("b")]
    etcd.put(layout.task_key(targets[0]), b"older")
    revision = client.send_tasks(etcd, layout, targets, TASK)
    for target in targets:
        assert state(etcd, layout.task_key(target))[:2] == (TASK.encode(), revision)


def test_a_write_applied_but_unanswered_is_not_applied_again(
    etcd: Any, layout: keys.Layout
) -> None:
    target = keys.Target.node("a")
    key = layout.task_key(target)
    etcd.put(key, b"before")
    lossy = Lossy(etcd, ["applied"])
    revision = client.send_task(lossy, layout, target, TASK)
    assert lossy.attempts == 2
    assert state(etcd, key) == (TASK.encode(), revision, 2), "one new revision, not two"


def test_a_write_lost_on_the_way_is_sent_again(etcd: Any, layout: keys.Layout) -> None:
    target = keys.Target.node("a")
    lossy = Lossy(etcd, ["dropped", "dropped"])
    revision = client.send_task(lossy, layout, target, TASK)
    assert state(etcd, layout.task_key(target)) == (TASK.encode(), revision, 1)


def test_no_answer_at_all_says_the_outcome_is_unknown(etcd: Any, layout: keys.Layout) -> None:
    target = keys.Target.node("a")
    lossy = Lossy(etcd, ["dropped"] * client.SEND_ATTEMPTS)
    with pytest.raises(client.SendOutcomeUnknown) as raised:
        client.send_task(lossy, layout, target, TASK)
    assert "may or may not have been written" in str(raised.value)
    assert "at most once" in str(raised.value)
    assert state(etcd, layout.task_key(target)) == (None, 0, 0)
    # What gleam-client prints (it exits 1): one line, no traceback.
    settings = connection.make_settings("http://127.0.0.1:2379")
    shown = cli.etcd_failure(settings, raised.value)
    assert "may or may not have been written" in shown and "\n" not in shown


def test_a_key_changed_by_someone_else_while_in_doubt_is_not_written_over(
    etcd: Any, layout: keys.Layout
) -> None:
    """Our first attempt may have landed before their write: sending ours again could
    apply it twice, so the send stops and says the outcome is unknown."""
    target = keys.Target.node("a")
    lossy = Lossy(etcd, ["dropped", "theirs"])
    with pytest.raises(client.SendOutcomeUnknown, match="changed while the write was in doubt"):
        client.send_task(lossy, layout, target, TASK)
    assert state(etcd, layout.task_key(target))[0] == b"theirs"


def test_a_key_changed_by_someone_else_before_our_write_is_written_over(
    etcd: Any, layout: keys.Layout
) -> None:
    """No doubt about ours (it failed its compare): a hand-sent task goes on top, as a
    plain put would."""
    target = keys.Target.node("a")
    lossy = Lossy(etcd, ["theirs"])
    revision = client.send_task(lossy, layout, target, TASK)
    assert state(etcd, layout.task_key(target)) == (TASK.encode(), revision, 2)


def test_keys_that_change_under_every_attempt_are_a_conflict_and_nothing_of_ours_is_written(
    etcd: Any, layout: keys.Layout
) -> None:
    target = keys.Target.node("a")
    with pytest.raises(client.SendConflict, match="the task was not written"):
        client.send_task(ConflictEveryTime(etcd), layout, target, TASK)
    assert state(etcd, layout.task_key(target))[0] == b"theirs"


class ConflictEveryTime(Lossy):
    """Someone else writes the keys between our read and every guarded write."""

    def __init__(self, etcd: Any) -> None:
        super().__init__(etcd, [])

    def transaction(self, compare: list[Any], success: list[Any], failure: list[Any]) -> Any:
        if compare:
            for op in success:
                self._etcd.put(op.key, b"theirs")
        return self._etcd.transaction(compare=compare, success=success, failure=failure)


def test_landed_needs_our_value_on_every_key_at_one_newer_revision() -> None:
    ours, seen = b"ours", {"/a": 4, "/b": 0}
    values = {"/a": ours, "/b": ours}

    def now(a: tuple[bytes, int] | None, b: tuple[bytes, int] | None) -> dict[str, Any]:
        return {
            "/a": client.Stored(*a) if a else None,
            "/b": client.Stored(*b) if b else None,
        }

    assert client.landed(values, seen, now((ours, 9), (ours, 9))) == 9
    assert client.landed(values, seen, now((ours, 9), (ours, 10))) is None  # two writes
    assert client.landed(values, seen, now((ours, 4), (ours, 9))) is None  # /a never moved
    assert client.landed(values, seen, now((b"theirs", 9), (ours, 9))) is None
    assert client.landed(values, seen, now((ours, 9), None)) is None
    # Signed, each key has its own value: /b holding /a's message is not our write.
    signed = {"/a": b"for a", "/b": b"for b"}
    assert client.landed(signed, seen, now((b"for a", 9), (b"for b", 9))) == 9
    assert client.landed(signed, seen, now((b"for a", 9), (b"for a", 9))) is None


def test_more_targets_than_one_transaction_takes_is_refused_by_etcd_whole(
    etcd: Any, layout: keys.Layout
) -> None:
    """All keys or none: etcd refuses the transaction (gleam-client prints its error)."""
    targets = [keys.Target.node(f"n{i}") for i in range(connection.MAX_TXN_OPS + 1)]
    with pytest.raises(connection.ETCD_ERRORS) as raised:
        client.send_tasks(etcd, layout, targets, TASK)
    assert not isinstance(raised.value, client.SendOutcomeUnknown)
    assert "too many operations" in connection.describe_error(raised.value)
    assert list(etcd.get_prefix(layout.tasks_prefix(keys.Kind.NODE))) == []
