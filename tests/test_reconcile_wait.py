"""gleam-reconcile --wait with real agent subprocesses: ok, a failing Lua task, silence."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gleam import client, keys
from gleam.embedded import EtcdServer
from reconciler import gitsource, manifests
from tests.reconcile_support import OpsRepo, run_cli
from tests.support import ROOT, AgentProcess, wait_until

pytestmark = pytest.mark.slow


def example_repo(tmp_path: Path) -> OpsRepo:
    """An ops repository holding a copy of the project's own tasks/ tree."""
    repo = OpsRepo(tmp_path / "ops")
    shutil.copytree(ROOT / "tasks", repo.path / "tasks")
    repo.commit("the project's example tasks")
    return repo


def test_the_projects_example_tasks_are_valid_and_run_the_example_scripts() -> None:
    loaded = manifests.load(gitsource.read_worktree(ROOT).files)
    names = {m.task.name for m in loaded.values()}
    assert names == {"print", "etcd", "config::sync"}
    for name in names:
        assert (ROOT / "scripts" / Path(*keys.function_path_parts(name))).is_file()


def test_wait_reports_each_agent_ok_then_a_failing_lua_task_makes_it_exit_1(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    tmp_path: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    repo = example_repo(tmp_path)
    start_agent(etcd_server.endpoint, "-id", "web-1", "-region", "eu:web", layout=layout)
    start_agent(etcd_server.endpoint, "-id", "web-2", "-region", "eu:web", layout=layout)
    wait_until(lambda: len(client.list_agents(etcd, layout)) == 2, what="two agents registered")

    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "--wait", "60")
    assert code == 0, out + err
    assert f"ok      web-1  {layout.node_key('web-1')} @" in out
    assert f"ok      web-1  {layout.region_key('web')} @" in out
    assert f"ok      web-2  {layout.region_key('web')} @" in out
    assert "--wait: 3 of 3 agent result(s) ok." in out

    # A manifest whose Lua fails: config::sync reading an etcd key that does not exist.
    repo.node("web-2", "config::sync", "data: no-such-key-for-this-test\n")
    repo.commit("break web-2")
    code, out, err = run_cli(
        capsys, etcd_server.endpoint, layout, repo, "--wait", "60", "--output", "json"
    )
    assert code == 1, out + err
    body = json.loads(out)
    assert body["ok"] is False
    [report] = body["wait"]
    assert (report["agent"], report["outcome"]) == ("web-2", "failed")
    assert "no-such-key-for-this-test" in report["error"]


def test_wait_fails_when_a_live_agent_does_not_answer_in_time(
    capsys: Any,
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    tmp_path: Path,
    start_agent: Callable[..., AgentProcess],
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", "print")
    repo.commit("one node")
    agent = start_agent(etcd_server.endpoint, "-id", "web-1", layout=layout)
    wait_until(lambda: client.list_agents(etcd, layout), what="the agent registered")
    agent.signal(signal.SIGSTOP)  # registered (its lease lives on for a while) but frozen
    try:
        code, out, _ = run_cli(capsys, etcd_server.endpoint, layout, repo, "--wait", "0.5")
    finally:
        agent.signal(signal.SIGCONT)
    assert code == 1
    assert f"no answer in 0.5s  web-1  {layout.node_key('web-1')}" in out
