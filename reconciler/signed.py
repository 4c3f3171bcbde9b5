"""`gleam-reconcile -sign_key FILE`: the plan's writes carry a signature (gleam/signing.py).

Pure: the reconciler plans with unsigned messages as always; `comparable` shows it the
messages it signed itself as unsigned (so they are not rewritten at every pass), and
`sign_plan` signs each write just before it is sent, with P the mod_revision the write's
transaction compares (or etcd's revision, for a key that must not exist yet).
"""

from __future__ import annotations

import dataclasses
import json

from gleam import messages, signing
from reconciler import diff, sync


def comparable(observed: sync.EtcdState, signer: signing.Signer) -> sync.EtcdState:
    """`observed` with each value this reconciler signed shown unsigned, when nobody has
    written the key since: its ownership record, written in the same transaction, has the
    same mod_revision. Any other value (unsigned, signed by another key, or written again
    by anyone else, a replayed old message too) must be written again, signed: it is shown
    with a trailing space, which no wanted (canonical) message has, so the plan updates it."""
    actual = {}
    for key, have in observed.actual.items():
        plain = None
        if observed.owned.get(key) == have.mod_revision:
            plain = signing.unsigned_if_ours(have.value, signer.fingerprint)
        actual[key] = diff.Actual(
            plain if plain is not None else have.value + b" ", have.mod_revision
        )
    return sync.EtcdState(actual=actual, owned=observed.owned)


def sign_plan(plan: diff.Plan, signer: signing.Signer, *, revision: int) -> diff.Plan:
    """Every write of `plan` signed for its key; `revision` is etcd's revision at (or
    after) the read the plan came from, P for keys that do not exist yet."""
    changes = []
    for change in plan.changes:
        if change.action in diff.WRITES and change.new is not None:
            prev = change.mod_revision or revision
            message = json.loads(change.new)
            signed = signing.sign(message, key=change.key, prev=prev, signer=signer)
            change = dataclasses.replace(
                change, new=messages.canonical_json(signed).encode("utf-8")
            )
        changes.append(change)
    return dataclasses.replace(plan, changes=tuple(changes))
