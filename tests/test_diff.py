"""The plan is a pure function of (desired, actual, owned): table tests and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gleam import messages
from reconciler import diff
from reconciler.diff import Action, Actual, Change


def msg(name: str, data: messages.JSON = None) -> bytes:
    return messages.Task(name, data).encode()


A = msg("print", {"x": 1})
B = msg("print", {"x": 2})

# The table of plan cases: tests/cases/plans.yaml (tests/test_cases.py).


def test_plan_carries_the_revisions_to_guard_with() -> None:
    plan = diff.plan({"k": B}, {"k": Actual(A, 5)}, {"k": 6}, prune=False)
    assert plan.changes == (
        Change(Action.UPDATE, "k", new=B, old=A, mod_revision=5, owned_revision=6),
    )
    create = diff.plan({"n": A}, {}, {}, prune=False).changes[0]
    assert (create.mod_revision, create.owned_revision) == (0, 0)


def test_orphans_are_listed_when_not_pruning() -> None:
    plan = diff.plan({}, {"k": Actual(A, 5)}, {"k": 6, "gone": 7}, prune=False)
    assert plan.orphans == ("gone", "k") and not plan


def test_unchanged_is_counted() -> None:
    plan = diff.plan(
        {"a": A, "b": A}, {"a": Actual(A, 1), "b": Actual(A, 2)}, {"a": 1, "b": 2}, prune=True
    )
    assert plan.unchanged == 2 and not plan.changes


# Properties -------------------------------------------------------------------------------

key_st = st.sampled_from(
    [f"/g/node/n{i}" for i in range(8)] + [f"/g/region/r{i}" for i in range(4)]
)
json_st = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
value_st = st.builds(msg, st.sampled_from(["print", "etcd", "config::sync"]), json_st)
desired_st = st.dictionaries(key_st, value_st, max_size=10)
actual_values_st = st.dictionaries(key_st, value_st, max_size=10)


@given(desired=desired_st, owned_keys=st.sets(key_st))
def test_plan_of_desired_against_itself_is_empty(
    desired: dict[str, bytes], owned_keys: set[str]
) -> None:
    actual = {k: Actual(v, i + 1) for i, (k, v) in enumerate(sorted(desired.items()))}
    owned = {k: 100 for k in owned_keys | desired.keys()}
    for prune in (False, True):
        plan = diff.plan(
            desired, actual, {k: r for k, r in owned.items() if k in desired}, prune=prune
        )
        assert not plan.changes
        assert plan.unchanged == len(desired)


@given(desired=desired_st, values=actual_values_st, owned_keys=st.sets(key_st))
def test_applying_the_plan_gives_desired(
    desired: dict[str, bytes], values: dict[str, bytes], owned_keys: set[str]
) -> None:
    actual = {k: Actual(v, i + 1) for i, (k, v) in enumerate(sorted(values.items()))}
    owned = {k: 50 for k in owned_keys}
    plan = diff.plan(desired, actual, owned, prune=True)
    after, mine = diff.apply(plan, values, set(owned))
    # Every desired key holds its bytes and is owned; owned keys without a manifest are
    # gone; keys written by hand and not desired are untouched.
    for key, value in desired.items():
        assert after[key] == value and key in mine
    for key in owned_keys - desired.keys():
        assert key not in after and key not in mine
    for key in values.keys() - desired.keys() - owned_keys:
        assert after[key] == values[key]
    # ... and planning again finds nothing to do.
    again = diff.plan(
        desired, {k: Actual(v, 1) for k, v in after.items()}, {k: 1 for k in mine}, prune=True
    )
    assert not again.changes


@given(desired=desired_st, values=actual_values_st, owned_keys=st.sets(key_st))
def test_without_prune_nothing_is_ever_deleted(
    desired: dict[str, bytes], values: dict[str, bytes], owned_keys: set[str]
) -> None:
    actual = {k: Actual(v, 1) for k, v in values.items()}
    plan = diff.plan(desired, actual, {k: 1 for k in owned_keys}, prune=False)
    assert not any(c.action in (Action.DELETE, Action.FORGET) for c in plan.changes)
    assert set(plan.orphans) == owned_keys - desired.keys()


# What changed inside a message ------------------------------------------------------------


def test_describe_names_the_paths_that_changed() -> None:
    old = msg("config::sync", {"path": "/a", "mode": 1, "tags": ["x", "y"], "gone": True})
    new = msg("config::sync", {"path": "/b", "mode": 1, "tags": ["x", "z"], "new": 2})
    lines = [(f.path, f.old, f.new, f.added, f.removed) for f in diff.describe(old, new)]
    assert lines == [
        ("data.gone", True, None, False, True),
        ("data.new", None, 2, True, False),
        ("data.path", "/a", "/b", False, False),
        ("data.tags[1]", "y", "z", False, False),
    ]


def test_describe_a_renamed_function_and_a_hand_written_garbage_value() -> None:
    assert [f.path for f in diff.describe(msg("print", 1), msg("etcd", 1))] == ["name"]
    garbage = diff.describe(b"not json", msg("print", 1))
    assert garbage[0].path == "value" and "not a task message" in garbage[0].old
