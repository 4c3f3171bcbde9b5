"""gleam-client status shows where task keys came from: a real gleam-reconcile run on a
real git repository, against a real etcd."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gleam import cli, keys
from gleam.embedded import EtcdServer
from tests.reconcile_support import OpsRepo, run_cli

pytestmark = pytest.mark.slow


def test_status_shows_the_commit_the_reconciler_applied_and_hand_written_keys(
    etcd_server: EtcdServer,
    layout: keys.Layout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("ETCD", "PREFIX", "CONFIG"):
        monkeypatch.delenv(f"GLEAM_{name}", raising=False)
    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", data="data:\n  x: 1\n")
    repo.region("eu")
    sha = repo.commit("ops")
    connect = ["-etcd", etcd_server.endpoint, "-prefix", layout.prefix]
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, out + err

    def client(*argv: str) -> tuple[int, Any]:
        capsys.readouterr()
        code = cli.main([*connect, *argv])
        out, _ = capsys.readouterr()
        return code, out

    assert client("call", "node/by-hand", "print")[0] == 0
    code, out = client("status", "--output", "json")
    doc = json.loads(out)
    assert code == 0  # no live agent: nothing targeted, nothing failed or pending
    assert doc["applied_commit"] == sha
    origin = {t["key"]: (t["commit"], t["owner"]) for t in doc["tasks"]}
    assert origin == {
        layout.node_key("by-hand"): (None, None),
        layout.node_key("web-1"): (sha, "reconciler"),
        layout.region_key("eu"): (sha, "reconciler"),
    }
    _, text = client("status")
    commits = {
        line.split()[0]: line.split()[3]
        for line in text.splitlines()
        if line.startswith(layout.prefix)
    }
    assert commits[layout.node_key("web-1")] == sha[:12]
    assert commits[layout.node_key("by-hand")] == "-"
    assert f"reconciler applied {sha[:12]}" in text.splitlines()[0]

    # a key the reconciler owns, changed by hand since: its commit is no longer known
    assert client("call", "node/web-1", "print", '{"x": 2}')[0] == 0
    _, text = client("status")
    commits = {
        line.split()[0]: line.split()[3]
        for line in text.splitlines()
        if line.startswith(layout.prefix)
    }
    assert commits[layout.node_key("web-1")] == "?"
    assert commits[layout.region_key("eu")] == sha[:12]

    # a second commit changes only the region: each key keeps the commit that wrote it
    repo.region("eu", data="data: 2\n")
    second = repo.commit("eu")
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo)
    assert code == 0, out + err
    _, out = client("status", "--output", "json")
    doc = json.loads(out)
    assert doc["applied_commit"] == second
    origin = {t["key"]: t["commit"] for t in doc["tasks"]}
    assert origin[layout.region_key("eu")] == second
    assert origin[layout.node_key("web-1")] is None  # still the hand-written value
