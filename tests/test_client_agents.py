"""gleam-client end to end: real etcd, real gleam-agent subprocesses running Lua."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gleam import cli, client, keys
from gleam.embedded import EtcdServer
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_gleam_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ETCD", "PREFIX", "CONFIG", "CACERT", "CERT", "KEY", "USER", "PASSWORD"):
        monkeypatch.delenv(f"GLEAM_{name}", raising=False)


def scripts(root: Path, name: str, body: str) -> Path:
    """A script directory holding one function, `job`."""
    path = root / name
    path.mkdir()
    (path / "job.lua").write_text(body, encoding="utf-8")
    return path


def live_ids(etcd: Any, layout: keys.Layout) -> set[str]:
    return {a.id for a in client.list_agents(etcd, layout)}


def result_revision(etcd: Any, layout: keys.Layout, agent_id: str, target: keys.Target) -> int:
    value, _ = etcd.get(layout.result_key(agent_id, target))
    return int(json.loads(value)["revision"]) if value else 0


@pytest.fixture
def gleam_client(
    etcd_server: EtcdServer, layout: keys.Layout, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_wait_prints_each_agents_result_and_exits_0(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: Callable[..., AgentProcess],
    gleam_client: Callable[..., tuple[int, str, str]],
) -> None:
    start_agent(etcd_server.endpoint, "-id", "web-1", "-region", "eu", layout=layout)
    wait_until(lambda: "web-1" in live_ids(etcd, layout), what="web-1 registered")
    # a bare agent id resolves to its node key; the example `print` script returns nothing
    code, out, err = gleam_client(
        "-target", "web-1", "-fn", "print", "-data", '{"x": 1}', "-wait", "30"
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    revision = int(lines[0].rsplit(" ", 1)[1])
    assert lines[0] == f"wrote {layout.node_key('web-1')} at revision {revision}"
    assert lines[2].split()[:3] == ["web-1", layout.node_key("web-1"), "ok"]
    assert result_revision(etcd, layout, "web-1", keys.Target.node("web-1")) >= revision


def test_fleet_wait_and_status_with_ok_failing_pending_and_departed_agents(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: Callable[..., AgentProcess],
    gleam_client: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
) -> None:
    good = scripts(tmp_path, "good", "return {ran = gleam.id}\n")
    bad = scripts(tmp_path, "bad", 'error("boom")\n')
    endpoint = etcd_server.endpoint
    start_agent(endpoint, "-id", "a-ok", "-region", "eu", layout=layout, script_dir=good)
    b_fail = start_agent(endpoint, "-id", "b-fail", "-region", "eu", layout=layout, script_dir=bad)
    # a long lease, so that it stays registered while it is frozen below
    c_frozen = start_agent(
        endpoint, "-id", "c-frozen", "-region", "eu", "-ttl", "120", layout=layout, script_dir=good
    )
    d_gone = start_agent(endpoint, "-id", "d-gone", "-region", "eu", layout=layout, script_dir=good)
    everyone = {"a-ok", "b-fail", "c-frozen", "d-gone"}
    wait_until(lambda: live_ids(etcd, layout) == everyone, timeout=60, what="four agents up")
    eu = keys.Target.region("eu")

    # -wait: every agent answers, one failed -> exit 1, each agent's line says what happened
    code, out, err = gleam_client("-target", "eu", "-fn", "job", "-wait", "60")
    assert code == 1, out + err
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) == everyone
    assert rows["a-ok"].split()[2] == "ok" and '{"ran":"a-ok"}' in rows["a-ok"]
    assert rows["b-fail"].split()[2] == "failed" and "boom" in rows["b-fail"]
    assert rows["c-frozen"].split()[2] == rows["d-gone"].split()[2] == "ok"

    # d-gone leaves (its results stay); c-frozen stops answering but stays registered
    d_gone.stop()
    wait_until(lambda: "d-gone" not in live_ids(etcd, layout), what="d-gone deregistered")
    c_frozen.signal(signal.SIGSTOP)
    try:
        code, _, _ = gleam_client("call", "region/eu", "job", '{"second": true}')
        assert code == 0
        (entry,) = client.list_tasks(etcd, layout, keys.Kind.REGION)
        wait_until(
            lambda: all(
                result_revision(etcd, layout, a, eu) >= entry.revision for a in ("a-ok", "b-fail")
            ),
            what="a-ok and b-fail ran the second write",
        )

        code, out, _ = gleam_client("status")
        assert code == 1, out
        table = {
            line.split()[4]: line.split(None, 6)
            for line in out.splitlines()
            if line.startswith(layout.region_key("eu"))
        }
        assert {agent: cells[5] for agent, cells in table.items()} == {
            "a-ok": "ok",
            "b-fail": "failed",
            "c-frozen": "pending",
            "d-gone": "gone",
        }
        assert "boom" in table["b-fail"][6] and "\n" not in table["b-fail"][6]
        assert table["a-ok"][1] == "job" and table["a-ok"][2] == str(entry.revision)
        assert table["a-ok"][3] == "-"  # sent by hand: no commit
        assert table["c-frozen"][6].startswith("last ran rev ")
        assert table["d-gone"][6].startswith("last: ok at rev ")
        agents_section = out.split("TASKS")[0]
        for agent_id in ("a-ok", "b-fail", "c-frozen"):
            assert agent_id in agents_section
        assert "d-gone" not in agents_section

        code, out, _ = gleam_client("status", "--output", "json")
        doc = json.loads(out)
        assert code == 1 and doc["version"] == 1 and doc["exit_code"] == 1
        counts = {"ok": 1, "failed": 1, "pending": 1, "gone": 1, "unwatched": 0, "held": 0}
        counts |= {"invalid": 0, "invalid_registrations": 0}
        assert doc["summary"] == counts
        (task,) = doc["tasks"]
        states = {r["agent"]: (r["state"], r["live"]) for r in task["agents"]}
        assert states == {
            "a-ok": ("ok", True),
            "b-fail": ("failed", True),
            "c-frozen": ("pending", True),
            "d-gone": ("gone", False),
        }
        assert {a["id"] for a in doc["agents"]} == {"a-ok", "b-fail", "c-frozen"}
        assert all(a["version"] and a["hostname"] and a["started"] for a in doc["agents"])

        # the failing agent leaves: nothing failed any more, one is still pending -> 2
        b_fail.stop()
        wait_until(lambda: "b-fail" not in live_ids(etcd, layout), what="b-fail deregistered")
        code, out, _ = gleam_client("status")
        assert code == 2, out
    finally:
        c_frozen.signal(signal.SIGCONT)

    # the frozen agent wakes up and runs the write it missed -> everything targeted is ok
    wait_until(
        lambda: result_revision(etcd, layout, "c-frozen", eu) >= entry.revision,
        timeout=60,
        what="c-frozen caught up",
    )
    code, out, _ = gleam_client("status")
    assert code == 0, out
