"""Target resolution (`-target`): pure table tests and properties, no etcd."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gleam import keys, messages, targeting


def agent(agent_id: str, *regions: str) -> messages.AgentInfo:
    return messages.AgentInfo(agent_id, "host", 1, list(regions), "0.1.0", "", "/s")


# web-1 and web-2 watch eu; web-2 also watches web; db-1 watches db-1 (a region named
# like the agent itself); "web-1" is also... nothing else.
FLEET = [agent("web-1", "eu"), agent("web-2", "eu", "web"), agent("db-1", "db-1"), agent("x")]

N = keys.Target.node
R = keys.Target.region


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["web-1:eu"], ["web-1", "eu"]),
        (["web-1,eu"], ["web-1", "eu"]),
        (["node/a:region/b", "c"], ["node/a", "region/b", "c"]),
        ([" a : b ,, c "], ["a", "b", "c"]),
        ([":", ""], []),
        ([], []),
    ],
)
def test_split_specs_splits_on_colons_and_commas(values: list[str], expected: list[str]) -> None:
    assert targeting.split_specs(values) == expected


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        # explicit forms need no live agent at all
        (["node/web-9"], [N("web-9")]),
        (["region/nowhere"], [R("nowhere")]),
        (["node/db-1", "region/db-1"], [N("db-1"), R("db-1")]),
        # a bare agent id is its node
        (["web-1"], [N("web-1")]),
        (["x"], [N("x")]),
        # a bare region some live agent watches is the region
        (["eu"], [R("eu")]),
        (["web"], [R("web")]),
        # the seed README's example: a node and a region in one -target
        (["web-1", "eu"], [N("web-1"), R("eu")]),
        # duplicates collapse, order kept
        (["eu", "region/eu", "web-1", "node/web-1"], [R("eu"), N("web-1")]),
    ],
)
def test_resolve(specs: list[str], expected: list[keys.Target]) -> None:
    assert list(targeting.resolve(specs, FLEET)) == expected


@pytest.mark.parametrize(
    ("specs", "fragments"),
    [
        # both a live agent's id and a region a live agent watches
        (["db-1"], ["'db-1' is ambiguous", "db-1", "node/db-1 or region/db-1"]),
        # neither
        (["web-3"], ["'web-3' is neither", "node/web-3 or region/web-3"]),
        # malformed explicit forms and names
        (["host/web-1"], ["'host/web-1'", "node/<id> or region/<name>"]),
        (["node/../etc"], ["'node/../etc'", "invalid"]),
        (["node/"], ["'node/'", "non-empty"]),
        (["-web"], ["'-web'", "invalid"]),
        ([], ["no target given"]),
    ],
)
def test_resolve_refuses_with_the_explicit_form_to_use(
    specs: list[str], fragments: list[str]
) -> None:
    with pytest.raises(targeting.TargetError) as caught:
        targeting.resolve(specs, FLEET)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_resolve_reports_every_bad_target_and_returns_none() -> None:
    with pytest.raises(targeting.TargetError) as caught:
        targeting.resolve(["web-1", "db-1", "nope", "eu"], FLEET)
    assert len(caught.value.problems) == 2
    assert "'db-1'" in caught.value.problems[0]
    assert "'nope'" in caught.value.problems[1]


def test_bare_names_resolve_only_against_live_agents() -> None:
    with pytest.raises(targeting.TargetError, match="neither"):
        targeting.resolve(["web-1"], [])


def test_needs_agents_only_for_bare_names() -> None:
    assert not targeting.needs_agents(["node/a", "region/b"])
    assert targeting.needs_agents(["node/a", "b"])


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(
    ids=st.lists(names, max_size=5, unique=True),
    regions=st.lists(names, max_size=5, unique=True),
    spec=names,
)
def test_a_bare_name_resolves_to_the_one_thing_it_names(
    ids: list[str], regions: list[str], spec: str
) -> None:
    fleet = [agent(i, *regions) for i in ids]
    is_node, is_region = spec in ids, bool(ids) and spec in regions
    if is_node == is_region:
        with pytest.raises(targeting.TargetError):
            targeting.resolve([spec], fleet)
    else:
        kind = keys.Kind.NODE if is_node else keys.Kind.REGION
        assert targeting.resolve([spec], fleet) == (keys.Target(kind, spec),)
