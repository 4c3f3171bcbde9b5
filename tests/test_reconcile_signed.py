"""`gleam-reconcile -sign_key` on the in-memory etcd: every write is signed for its key and
at the P its transaction compares, on several threads (reconciler.signed.sign_plan);
tests/test_trust_e2e.py runs the same against a real etcd and a -trust agent."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import pytest

from agent import trust
from gleam import messages
from gleam.fake_etcd import FakeEtcd
from reconciler import diff, reconcile, signed, sync
from tests.test_reconcile_pass import LAYOUT, node, run, wanted
from tests.test_signing import SIGNER, trusted

NAMES = [f"web-{n}" for n in range(300)]  # several transactions, sent in parallel


def stored(fake: FakeEtcd) -> dict[str, tuple[bytes, int]]:
    from gleam.etcdapi import Range

    found = fake.range(Range(LAYOUT.prefix + "/node/", prefix=True))
    return {kv.key.decode(): (kv.value, kv.mod_revision) for kv in found.kvs}


def changed(desired: Any, n: int) -> Any:
    """`desired` with every node's data changed to `n`."""
    value = messages.Task("print", {"n": n}).encode()
    entries = {k: dataclasses.replace(e, value=value) for k, e in desired.entries.items()}
    return dataclasses.replace(desired, entries=entries)


def test_every_write_is_signed_for_its_key_at_the_revision_its_transaction_compares() -> None:
    fake = FakeEtcd()
    before = fake.revision
    first = run(fake, wanted(*NAMES), signer=SIGNER)
    assert len(first.applied) == len(NAMES)
    assert len(sync.batches(first.plan.changes)) > 2
    created = stored(fake)
    for key, (value, revision) in created.items():
        assert trust.check(value, key=key, last_run=None, trusted=trusted(SIGNER)) is None
        prev = json.loads(value)["Sig"]["prev"]
        assert before <= prev < revision  # etcd's revision when the key did not exist
    # Its own signed values are what it wants: nothing is written again.
    assert not run(fake, wanted(*NAMES, commit="c2"), signer=SIGNER).applied
    # An update's P is the mod_revision the write compared: the value it replaced.
    run(fake, changed(wanted(*NAMES, commit="c3"), 2), signer=SIGNER)
    for key, (value, revision) in stored(fake).items():
        assert (
            trust.check(value, key=key, last_run=created[key][1], trusted=trusted(SIGNER)) is None
        )
        assert json.loads(value)["Sig"]["prev"] == created[key][1] < revision
        assert messages.decode_task(value).data == {"n": 2}


def test_a_value_written_by_hand_before_the_apply_is_replaced_signed_at_its_revision() -> None:
    fake = FakeEtcd()
    hand = {}

    def meddle(_plan: diff.Plan) -> None:
        hand["revision"] = fake.put(node("web-1"), b"by hand")

    result = run(fake, wanted("web-1"), signer=SIGNER, before_apply=meddle)
    assert result.replans == 1
    value, _revision = stored(fake)[node("web-1")]
    assert json.loads(value)["Sig"]["prev"] == hand["revision"]
    assert trust.check(value, key=node("web-1"), last_run=hand["revision"],
                       trusted=trusted(SIGNER)) is None  # fmt: skip


def test_a_plan_signed_on_several_threads_is_the_plan_signed_on_one() -> None:
    task = messages.Task("print", {"n": 1}).encode()
    creates = [diff.Change(diff.Action.CREATE, node(f"web-{n}"), new=task) for n in range(600)]
    updates = [
        diff.Change(diff.Action.UPDATE, node(f"db-{n}"), new=task, old=b"{}", mod_revision=n + 9)
        for n in range(300)
    ]
    forget = [diff.Change(diff.Action.FORGET, node("gone"), owned_revision=3)]
    plan = diff.Plan(changes=tuple(creates + forget + updates))
    one = signed.sign_plan(plan, SIGNER, revision=7, threads=1)
    assert signed.sign_plan(plan, SIGNER, revision=7, threads=3) == one
    assert [c.key for c in one.changes] == [c.key for c in plan.changes]
    assert one.changes[len(creates)] == forget[0]
    for change in one.changes:
        if change.new is not None:
            prev = json.loads(change.new)["Sig"]["prev"]
            assert prev == (change.mod_revision or 7)
            assert trust.check(change.new, key=change.key, last_run=prev,
                               trusted=trusted(SIGNER)) is None  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("gleam-sign")]


def _near_the_limit() -> bytes:
    """A task message a few bytes under the agents' size limit: valid unsigned, too
    large once its signature is added."""
    overhead = len(messages.Task("print", "").encode())
    value = messages.Task("print", "x" * (messages.MAX_MESSAGE_BYTES - overhead - 10)).encode()
    assert len(value) == messages.MAX_MESSAGE_BYTES - 10
    return value


def test_a_message_too_large_once_signed_stops_the_pass_before_anything_is_written() -> None:
    fake = FakeEtcd()
    desired = wanted("web-1", "web-2")
    big = dataclasses.replace(desired.entries[node("web-2")], value=_near_the_limit())
    desired = dataclasses.replace(desired, entries={**desired.entries, node("web-2"): big})
    with pytest.raises(reconcile.ReconcileError) as refused:
        run(fake, desired, signer=SIGNER)
    assert str(refused.value).startswith(f"-sign_key: task message for {node('web-2')} is ")
    assert "once signed, over the 1048576-byte limit agents accept; nothing written" in str(
        refused.value
    )
    assert stored(fake) == {}
    # Unsigned, the same message is within the limit and is written.
    assert len(run(fake, desired).applied) == 2
