"""`gleam-reconcile -sign_key` on the in-memory etcd: each batch's writes are signed in
the thread that sends it (sync.Prepare), for the key and at the P its transaction
compares; tests/test_trust_e2e.py runs the same against a real etcd and a -trust agent."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import pytest

from agent import trust
from gleam import etcdapi, messages, signing
from gleam.fake_etcd import FakeEtcd
from reconciler import diff, signed, sync
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


def test_batches_leave_room_for_the_signatures_prepare_adds() -> None:
    # Values that fill transactions by size: once signed, each batch must still fit.
    big = messages.Task("print", {"blob": "x" * 60_000}).encode()
    changes = [diff.Change(diff.Action.CREATE, node(f"web-{n}"), new=big) for n in range(200)]
    prepare = signed.prepare(SIGNER, revision=7)
    plain = sync.batches(changes)
    grown = sync.batches(changes, growth=prepare.growth)
    assert len(grown) >= len(plain)
    for batch in grown:
        sent = prepare.batch(batch)
        assert [c.key for c in sent] == [c.key for c in batch]
        size = sum(sync._cost(c)[1] for c in sent)
        assert size <= sync.MAX_TXN_BYTES - 4096
    assert signing.growth(node("web-1")) >= len(
        signing.sign_encoded(big, key=node("web-1"), prev=2**63 - 1, signer=SIGNER)
    ) - len(big)


def test_an_apply_that_fails_raises_and_leaves_no_signing_thread_behind() -> None:
    fake = FakeEtcd()
    store = sync.Store(fake, LAYOUT)
    task = messages.Task("print", {}).encode()
    changes = [diff.Change(diff.Action.CREATE, node(f"web-{n}"), new=task) for n in range(300)]
    signed_batches = []
    signing_prepare = signed.prepare(SIGNER, revision=1)

    def counting(batch: list[diff.Change]) -> list[diff.Change]:
        signed_batches.append(len(batch))
        return signing_prepare.batch(batch)

    def refuse(call: str) -> None:
        if call == "txn":
            raise etcdapi.EtcdError("UNAVAILABLE: etcd is down")

    fake.fail = refuse
    prepare = sync.Prepare(batch=counting, growth=signing_prepare.growth)
    with pytest.raises(sync.EtcdFailed, match="etcd is down"):
        store.apply_changes(changes, prepare=prepare)
    assert not [t for t in threading.enumerate() if t.name.startswith("gleam-prepare")]
    assert signed_batches  # the first batch at least was signed and sent
    assert fake.values(LAYOUT.prefix + "/") == {}
