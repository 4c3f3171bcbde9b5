"""Table cases kept as data files in tests/cases/ (the pyinfra way): plans for
reconciler/diff.plan and manifests for reconciler/manifests.load. A new case is a few
lines of YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gleam import messages
from reconciler import diff, manifests

CASES = Path(__file__).with_name("cases")
VALUES = {
    "A": messages.Task("print", {"x": 1}).encode(),
    "B": messages.Task("print", {"x": 2}).encode(),
}


def cases(name: str) -> list[Any]:
    loaded = yaml.safe_load((CASES / name).read_text(encoding="utf-8"))
    return [
        pytest.param(case, id=case.get("case") or f"{case.get('file')}: {case['text'][:30]!r}")
        for case in loaded
    ]


@pytest.mark.parametrize("case", cases("plans.yaml"))
def test_plan(case: dict[str, Any]) -> None:
    desired = {k: VALUES[v] for k, v in (case.get("desired") or {}).items()}
    actual = {k: diff.Actual(VALUES[v], rev) for k, (v, rev) in (case.get("actual") or {}).items()}
    plan = diff.plan(desired, actual, case.get("owned") or {}, prune=case.get("prune", False))
    assert [[c.action.value, c.key] for c in plan.changes] == case["expect"]


@pytest.mark.parametrize("case", cases("manifests.yaml"))
def test_manifest(case: dict[str, Any]) -> None:
    files = [(case["file"], case["text"].encode())]
    if "error" in case:
        with pytest.raises(manifests.InvalidManifests) as caught:
            manifests.load(files)
        assert [str(e)[: len(case["error"])] for e in caught.value.errors] == [case["error"]]
    else:
        (loaded,) = manifests.load(files).values()
        assert loaded.value == case["expect"].encode()
