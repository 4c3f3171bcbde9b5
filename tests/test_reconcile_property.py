"""A property against real etcd and git: after any sequence of commits, each applied
incrementally with --prune, etcd holds exactly the manifests of HEAD (plus the keys
written by hand, untouched), the reconciler owns exactly those manifests' keys, and a
full re-check finds nothing to do."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gleam import keys, messages
from reconciler import reconcile, sync
from tests.reconcile_support import OpsRepo, values

# Targets by their file path without extension; each commit picks .yaml or .yml for
# each file, so renames between the two spellings happen too.
STEMS = [f"tasks/nodes/n{i}" for i in range(5)] + ["tasks/regions/eu", "tasks/regions/us"]
FILES = [stem + ext for stem in STEMS for ext in (".yaml", ".yml")]

manifest_st = st.tuples(
    st.sampled_from([".yaml", ".yml"]),
    st.sampled_from(["print", "etcd", "config::sync"]),
    st.one_of(
        st.none(),
        st.integers(0, 3),
        st.dictionaries(st.sampled_from("abc"), st.integers(0, 2), max_size=2),
    ),
)
tree_st = st.dictionaries(st.sampled_from(STEMS), manifest_st, max_size=len(STEMS))


def target_of(stem: str) -> keys.Target:
    kind, name = stem.split("/")[1:]
    return keys.Target.node(name) if kind == "nodes" else keys.Target.region(name)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(trees=st.lists(tree_st, min_size=1, max_size=4))
def test_any_sequence_of_commits_converges_to_head(etcd: Any, trees: list[dict[str, Any]]) -> None:
    layout = keys.Layout(f"/p{uuid.uuid4().hex[:10]}")
    hand_key = layout.node_key("by-hand")
    etcd.put(hand_key, b'{"Name":"print","Data":"mine"}')
    with tempfile.TemporaryDirectory() as tmp:
        repo = OpsRepo(Path(tmp) / "ops")
        for tree in trees:
            for path in FILES:
                (repo.path / path).unlink(missing_ok=True)
            for stem, (ext, name, data) in tree.items():
                repo.write(stem + ext, messages.canonical_json({"name": name, "data": data}) + "\n")
            repo.commit("step")
            options = reconcile.Options(repo=repo.path, prune=True, allow_empty=True)
            reconcile.run(sync.Store.over(etcd, layout), options)

            want = {
                layout.task_key(target_of(stem)): messages.Task(name, data).encode()
                for stem, (_ext, name, data) in tree.items()
            }
            got = {
                k: v
                for k, v in values(etcd, layout.prefix + "/").items()
                if layout.parse_task_key(k) is not None
            }
            assert got == {**want, hand_key: b'{"Name":"print","Data":"mine"}'}
            owned = {
                f"{layout.prefix}/{k[len(layout.owned_prefix) :]}"
                for k in values(etcd, layout.owned_prefix)
            }
            assert owned == set(want)
            check = reconcile.run(
                sync.Store.over(etcd, layout),
                reconcile.Options(repo=repo.path, prune=True, full=True, dry_run=True),
            )
            assert not check.plan.changes
