"""`gleam-reconcile -sign_key FILE`: the plan's writes carry a signature (gleam/signing.py).

Pure: the reconciler plans with unsigned messages as always; `comparable` shows it the
messages it signed itself as unsigned (so they are not rewritten at every pass), and
`prepare` signs each batch's writes (sync.Prepare), with P the mod_revision that batch's
transaction compares (or etcd's revision, for a key that must not exist yet). The
batches are signed by one thread a core, just before the transactions (sync.prepared):
Ed25519 signing releases the GIL.
"""

from __future__ import annotations

import dataclasses

from gleam import signing
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


def sign_changes(
    changes: list[diff.Change], signer: signing.Signer, *, revision: int
) -> list[diff.Change]:
    """Every write of `changes` signed for its key; `revision` is etcd's revision at (or
    after) the read the plan came from, P for keys that do not exist yet. P is the very
    mod_revision the write's transaction compares (sync.txn_parts), or, for a key that
    must not exist, a revision at which it did not."""
    signed = []
    for change in changes:
        if change.action in diff.WRITES and change.new is not None:
            prev = change.mod_revision or revision
            value = signing.sign_encoded(change.new, key=change.key, prev=prev, signer=signer)
            change = dataclasses.replace(change, new=value)
        signed.append(change)
    return signed


def prepare(signer: signing.Signer, *, revision: int) -> sync.Prepare:
    """The sync.Prepare that signs each batch's writes (see `sign_changes`)."""
    return sync.Prepare(
        batch=lambda changes: sign_changes(changes, signer, revision=revision),
        growth=lambda change: signing.growth(change.key),
    )
