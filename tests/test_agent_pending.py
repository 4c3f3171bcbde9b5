"""agent.pending: the queue's rules, as tables and properties (pure, no etcd)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import pending
from agent.pending import Completed, Job, Observed, Pending

A, B = "/g/node/a", "/g/region/eu"


def put(key: str, revision: int) -> Observed:
    return Observed(key, revision, f"v{revision}".encode())


def delete(key: str, revision: int) -> Observed:
    return Observed(key, revision, None)


def drain(state: Pending) -> list[Job]:
    jobs = []
    while (job := state.take()) is not None:
        jobs.append(job)
        state.complete(job)
    return jobs


def test_jobs_run_one_at_a_time_in_revision_order() -> None:
    state = Pending()
    state.observe_all([put(B, 7), put(A, 5)])
    first = state.take()
    assert first is not None and (first.key, first.revision) == (A, 5)
    assert state.take() is None, "a second job must wait until the first completes"
    state.complete(first)
    second = state.take()
    assert second is not None and (second.key, second.revision) == (B, 7)


def test_newest_value_of_a_key_wins_and_older_ones_are_skipped() -> None:
    state = Pending()
    notes = state.observe_all([put(A, 3), put(A, 4), put(A, 6)])
    assert notes == [
        pending.Queued(A, 3),
        pending.Superseded(A, 3, by=4),
        pending.Superseded(A, 4, by=6),
    ]
    [job] = drain(state)
    assert (job.revision, job.skipped, job.value) == (6, (3, 4), b"v6")


def test_a_change_while_the_key_runs_queues_only_the_newest_next() -> None:
    state = Pending()
    state.observe(put(A, 3))
    running = state.take()
    assert running is not None
    state.observe_all([put(A, 4), put(A, 5)])
    state.complete(running)
    [job] = drain(state)
    assert (job.revision, job.skipped) == (5, (4,))


def test_a_delete_runs_nothing_and_cancels_a_waiting_value() -> None:
    state = Pending()
    assert state.observe(delete(A, 2)) == [pending.Deleted(A, 2)]
    state.observe(put(A, 3))
    state.observe(put(A, 4))
    assert state.observe(delete(A, 5)) == [pending.Cancelled(A, (3, 4), by=5)]
    assert drain(state) == []


@pytest.mark.parametrize(
    ("completed", "revision", "runs"),
    [
        (Completed(5), 5, False),
        (Completed(5), 4, False),
        (Completed(5), 6, True),
        (Completed(5, frozenset({7})), 7, False),
        (Completed(5, frozenset({3})), 6, True),
    ],
)
def test_values_already_completed_do_not_run_again(
    completed: Completed, revision: int, runs: bool
) -> None:
    state = Pending()
    state.load_done({A: completed})
    state.observe(put(A, revision))
    assert [j.revision for j in drain(state)] == ([revision] if runs else [])


def test_the_same_change_seen_twice_is_ignored() -> None:
    state = Pending()
    state.observe(put(A, 3))
    assert state.observe(put(A, 3)) == [pending.Duplicate(A, 3)]
    assert state.observe(put(A, 2)) == [pending.Duplicate(A, 2)]
    assert [j.revision for j in drain(state)] == [3]


def test_a_completed_job_counts_as_done_with_its_skipped_revisions() -> None:
    state = Pending()
    state.observe_all([put(A, 3), put(A, 4)])
    drain(state)
    assert state.done[A] == Completed(4, frozenset({3}))


def test_undelivered_finds_changes_a_read_shows_and_the_watch_did_not_bring() -> None:
    state = Pending()
    state.observe_all([put(A, 3), delete(B, 3)])
    assert state.undelivered({A: 3, B: None}, read_at=3) == {}
    assert state.undelivered({A: 5, B: None}, read_at=5) == {A: 5}
    state.observe(put(B, 6))
    # B absent in a read at 7 while the queue last saw it present at 6: a missed delete.
    assert state.undelivered({A: 3, B: None}, read_at=7) == {B: None}
    # ... but a put after the read is not a miss.
    assert state.delivered(B, None, read_at=5)


# Properties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # "put", "delete", "run"
    key: str


ops = st.lists(
    st.builds(Op, st.sampled_from(["put", "put", "delete", "run"]), st.sampled_from([A, B])),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_every_put_is_run_skipped_cancelled_or_still_pending_exactly_once(
    script: list[Op],
) -> None:
    state = Pending()
    revision = 0
    puts: list[tuple[str, int]] = []
    ran: list[Job] = []
    cancelled: list[int] = []
    last: dict[str, Observed] = {}
    for op in script:
        if op.kind == "run":
            job = state.take()
            if job is not None:
                ran.append(job)
                state.complete(job)
            continue
        revision += 1
        change = put(op.key, revision) if op.kind == "put" else delete(op.key, revision)
        if op.kind == "put":
            puts.append((op.key, revision))
        last[op.key] = change
        for note in state.observe(change):
            if isinstance(note, pending.Cancelled):
                cancelled.extend(note.revisions)
    # Drain; whatever waits at the end runs now.
    ran.extend(drain(state))
    run_revisions = [j.revision for j in ran]
    skipped = [r for j in ran for r in j.skipped]
    accounted = sorted(run_revisions + skipped + cancelled)
    assert accounted == sorted(r for _k, r in puts), "each put accounted for exactly once"
    assert run_revisions == sorted(run_revisions), "jobs run in revision order"
    for key, change in last.items():
        key_runs = [j.revision for j in ran if j.key == key]
        if change.value is not None:
            assert key_runs and key_runs[-1] == change.revision, "the newest value runs last"


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(min_value=0, max_value=40))
def test_a_restarted_queue_with_the_done_records_runs_nothing_twice(
    script: list[Op], cut: int
) -> None:
    """Replaying the same changes into a fresh queue loaded with the first queue's
    completions (an agent restart) runs only what the first did not complete."""
    changes: list[Observed] = []
    revision = 0
    for op in script:
        if op.kind != "run":
            revision += 1
            changes.append(put(op.key, revision) if op.kind == "put" else delete(op.key, revision))
    first = Pending()
    first.observe_all(changes[:cut])
    done_first = drain(first)
    second = Pending()
    second.load_done(first.done)
    second.observe_all(changes)
    again = {(j.key, j.revision) for j in drain(second)}
    assert not again & {(j.key, j.revision) for j in done_first}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from("abcde"), st.booleans()),  # a put or a delete of a key
            st.just(("take", True)),
        ),
        max_size=80,
    )
)
def test_take_always_gives_the_oldest_waiting_revision(steps: list[tuple[str, bool]]) -> None:
    """The heap behind `take` agrees with a scan of everything waiting, whatever mix of
    replaced, cancelled and finished values it has seen."""
    state = Pending()
    revision = 0
    for key, present in steps:
        if key == "take":
            expected = min((j.revision for j in state.waiting.values()), default=None)
            job = state.take()
            assert (job.revision if job else None) == expected
            if job is not None:
                state.complete(job)
            continue
        revision += 1
        state.observe(
            put(f"/g/node/{key}", revision) if present else delete(f"/g/node/{key}", revision)
        )
    remaining = sorted(j.revision for j in state.waiting.values())
    assert [j.revision for j in drain(state)] == remaining
