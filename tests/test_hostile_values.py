"""Hostile values stored in etcd (written with the raw client, as `etcdctl put` would):
every gleam-client read command and gleam-reconcile show them as a marker for that key,
with the rest of the output intact; none crashes (issue 8 item 4, issue 9)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gleam import cli, client, keys, messages, rollout
from gleam.embedded import EtcdServer
from tests.reconcile_support import OpsRepo
from tests.support import ROOT

# name -> the stored value. Each of these once crashed a command or the agent.
HOSTILE: dict[str, bytes] = {
    "huge-int": b'{"Name":"t::echo","Data":' + b"1" * 5000 + b"}",
    "deep": b'{"Name":"print","Data":' + b"[" * 990 + b"]" * 990 + b"}",
    "deeper": b'{"Name":"print","Data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nan": b'{"Name":"print","Data":[NaN,Infinity,1e999]}',
    "surrogate": b'{"Name":"print","Data":"\\ud800"}',
    "bad-utf8": b'{"Name":"print","Data":"\xff\xfe"}',
    "utf8-surrogate": b'{"Name":"print","Data":"\xed\xa0\x80"}',
    "terminal": b'{"Name":"print","Data":"\x1b[2J\x1b]0;pwned\x07"}',
    "not-json": b"\x1b[31m" + b"x" * 1000,
}
# Valid, but large: 1 MiB of tiny tables decodes to a task like any other.
TINY_TABLES = b'{"Name":"print","Data":[' + b"{}," * 349_000 + b"{}]}"
GOOD = messages.Task("print", {"fine": True}).encode()


def gleam_client(endpoint: str, layout: keys.Layout, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "gleam.cli", "-etcd", endpoint, "-prefix", layout.prefix, *args],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def reconcile(endpoint: str, layout: keys.Layout, repo: Path, *args: str) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", "-etcd", endpoint, "-prefix", layout.prefix]
        + ["--repo", str(repo), "--once", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def assert_clean(code: int, out: str, err: str, *, codes: tuple[int, ...] = (0,)) -> None:
    assert code in codes, (code, err)
    assert "Traceback" not in out + err, err
    # No raw control character reached the terminal (colour is off: not a tty).
    assert not any(ch in out for ch in "\x1b\x07"), out[:500]


@pytest.fixture
def stored(etcd: Any, layout: keys.Layout) -> dict[str, str]:
    """Hostile task values under node/ and region/, hostile results and registrations,
    broken reconciler records; returns {name: task key}."""
    task_keys = {}
    for name, value in HOSTILE.items():
        for kind in keys.Kind:
            key = layout.task_key(keys.Target(kind, name))
            etcd.put(key, value)
        task_keys[name] = layout.node_key(name)
    etcd.put(layout.node_key("tiny-tables"), TINY_TABLES)
    etcd.put(layout.node_key("good"), GOOD)
    live = messages.AgentInfo("good", "host\x1b[2J", 1, ["eu"], "0.1", "2026-11-28T22:00:00Z", "/s")
    etcd.put(layout.info_key("good"), live.encode())
    for agent, value in {
        "huge-int": b'{"id":"huge-int","pid":' + b"9" * 5000 + b"}",
        "deep": b'{"id":"deep","regions":' + b"[" * 990 + b"]" * 990 + b"}",
        "nan": b'{"id":"nan","pid":NaN}',
        "regions": b'{"id":"regions","regions":"eu"}',
    }.items():
        etcd.put(layout.info_key(agent), value)
    results = {
        "huge-int": b'{"agent":"good","key":"k","revision":' + b"1" * 5000 + b',"ok":true}',
        "deep": b'{"agent":"good","key":"k","revision":1,"ok":true,"result":'
        + b"[" * 990
        + b"]" * 990
        + b"}",
        "nan": b'{"agent":"good","key":"k","revision":1,"ok":true,"duration_ms":NaN}',
        "terminal": b'{"agent":"good","key":"k","revision":99999,"ok":false,'
        b'"error":"\\u001b]0;pwned\\u0007 boom"}',
        "good": b'{"agent":"good","key":"k","revision":1,"ok":true,"error":["not","text"]}',
    }
    for name, value in results.items():
        key = layout.node_key(name)
        etcd.put(
            f"{layout.prefix}/result/good/node/{name}", value.replace(b'"k"', f'"{key}"'.encode())
        )
    etcd.put(layout.applied_key, b'{"version":1,"commit":' + b"[" * 5000 + b"]" * 5000 + b"}")
    etcd.put(layout.owned_key(layout.node_key("deep")), b'{"commit":' + b"1" * 5000 + b"}")
    return task_keys


def test_status_shows_every_hostile_task_value_as_invalid_and_the_rest_intact(
    etcd_server: EtcdServer, layout: keys.Layout, stored: dict[str, str]
) -> None:
    code, out, err = gleam_client(etcd_server.endpoint, layout, "status")
    assert_clean(code, out, err, codes=(1,))  # unreadable records count as failures
    lines = out.splitlines()
    unreadable = {"huge-int", "deep", "nan"}  # agent good's result records for these keys
    for name, key in stored.items():
        row = next(line for line in lines if line.startswith(key + " "))
        assert "(invalid)" in row, row
        if name in unreadable:
            assert row.split()[4:8] == [
                "good", "invalid", "(invalid)", f"{layout.prefix}/result/good/node/{name}:"
            ], row  # fmt: skip
        else:
            assert "invalid message:" in row, row
    # Its result record is unreadable (an error that is not text): invalid, not pending.
    good = [line for line in lines if line.split()[:2] == [layout.node_key("good"), "print"]]
    assert len(good) == 1 and good[0].split()[5] == "invalid", good
    assert f"(invalid) {layout.prefix}/result/good/node/good: result " in good[0]
    for broken in ("huge-int", "deep", "nan", "regions"):  # registrations
        row = next(line for line in lines if line.startswith(broken + " "))
        assert f"(invalid) {layout.info_key(broken)}: registration " in row, row
    assert any(line.split()[:2] == [layout.node_key("tiny-tables"), "print"] for line in lines)
    assert "host\\x1b[2J" in out  # the hostile host name, shown escaped
    code, out, err = gleam_client(etcd_server.endpoint, layout, "status", "--output", "json")
    assert_clean(code, out, err, codes=(1,))
    doc = json.loads(out)
    assert doc["summary"]["invalid"] == 4 and doc["summary"]["invalid_registrations"] == 4
    tasks = {t["key"]: t for t in doc["tasks"]}
    (good_row,) = tasks[layout.node_key("good")]["agents"]
    assert (good_row["state"], good_row["live"]) == ("invalid", True)
    assert good_row["invalid"]["key"] == f"{layout.prefix}/result/good/node/good"
    assert tasks[stored["huge-int"]]["invalid"] == (
        "message holds an integer of more than 4300 digits"
    )
    assert tasks[stored["deep"]]["invalid"] == "message is nested deeper than 200 levels"
    assert tasks[stored["nan"]]["invalid"] == "message holds NaN, which is not JSON"
    assert "surrogate" in tasks[stored["surrogate"]]["invalid"]
    assert "not UTF-8" in tasks[stored["bad-utf8"]]["invalid"]
    assert tasks[layout.node_key("tiny-tables")]["invalid"] is None
    assert tasks[layout.node_key("good")]["function"] == "print"


@pytest.mark.parametrize("command", ["node", "region"])
def test_node_and_region_list_hostile_values_escaped(
    etcd_server: EtcdServer, layout: keys.Layout, stored: dict[str, str], command: str
) -> None:
    code, out, err = gleam_client(etcd_server.endpoint, layout, command)
    assert_clean(code, out, err)
    kind = keys.Kind(command)
    for name in HOSTILE:
        assert layout.task_key(keys.Target(kind, name)) in out
    assert "\\x1b[2J" in out
    code, out, err = gleam_client(etcd_server.endpoint, layout, command, "--output", "json")
    assert_clean(code, out, err)
    by_key = {t["key"]: t for t in json.loads(out)["tasks"]}
    for name in HOSTILE:
        item = by_key[layout.task_key(keys.Target(kind, name))]
        assert item["name"] is None and item["invalid"], item


def test_info_lists_the_good_registration_and_names_the_broken_ones_invalid(
    etcd_server: EtcdServer, layout: keys.Layout, stored: dict[str, str]
) -> None:
    code, out, err = gleam_client(etcd_server.endpoint, layout, "info")
    assert_clean(code, out, err)
    assert layout.info_key("good") in out and "host\\u001b[2J" in out
    broken = ["deep", "huge-int", "nan", "regions"]
    for name in broken:
        row = next(line for line in out.splitlines() if line.startswith(layout.info_key(name)))
        assert "(invalid) registration " in row, row
    code, out, err = gleam_client(etcd_server.endpoint, layout, "info", "--output", "json")
    assert_clean(code, out, err)
    agents = json.loads(out)["agents"]
    assert [a["id"] for a in agents] == ["good", *broken]
    assert [a["invalid"]["key"] for a in agents[1:]] == [layout.info_key(n) for n in broken]


def test_a_registration_stored_under_another_agents_key_is_named_invalid_everywhere(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    """Only an agent writes its registration, under its own id: one naming another id
    (an impostor of a live agent, an id that is no agent id) or under a key that is no
    agent id was written by hand. It is listed as invalid with its key, not as a live
    agent (info once crashed rebuilding its key from the id)."""

    def info(agent_id: str) -> bytes:
        return messages.AgentInfo(
            agent_id, "h", 1, ["eu"], "0.1", "2026-11-28T22:00:00Z", "/s"
        ).encode()

    etcd.put(layout.info_key("good"), info("good"))
    bad = {
        layout.info_key("impostor"): info("good"),
        layout.info_key("escape"): info("web\x1b[2J"),
        layout.info_prefix + "../x": info("../x"),
        layout.info_prefix: info(""),
    }
    for key, value in bad.items():
        etcd.put(key, value)
    code, out, err = gleam_client(etcd_server.endpoint, layout, "info")
    assert_clean(code, out, err)
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    assert [row[0] for row in rows] == [layout.info_key("good"), *sorted(bad)]
    assert all(row[1:2] == ["(invalid)"] for row in rows[1:]), rows
    assert "is for agent id 'good', not 'impostor' as its key says" in out
    code, out, err = gleam_client(etcd_server.endpoint, layout, "status", "--output", "json")
    assert_clean(code, out, err, codes=(1,))
    doc = json.loads(out)
    assert [(a["id"], a["invalid"] and a["invalid"]["key"]) for a in doc["agents"]] == [
        ("good", None),
        *((key[len(layout.info_prefix) :], key) for key in sorted(bad)),
    ]
    code, out, err = gleam_client(etcd_server.endpoint, layout, "-target", "eu", "-fn", "print")
    assert_clean(code, out, err)
    assert out.split()[:2] == ["wrote", layout.region_key("eu")]


def test_rollout_commands_show_hostile_gate_records_escaped(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    """Gate records hold what etcd holds: a region name (from the key), the gate's key
    and reason. `rollout status`, the driver's lines on a promote and a refusal show
    them escaped, never as raw escape sequences; a gate whose members are no agent ids
    is invalid (its driver would read their result keys), not a traceback."""
    plan = rollout.parse_plan({"waves": [1, "100%"]}).to_json()
    revisions = {}
    for region in ("web", "db", "bad"):
        etcd.put(layout.region_key(region), messages.Task("print", None, rollout=plan).encode())
        revisions[region] = int(etcd.get(layout.region_key(region))[1].mod_revision)

    def gate(region: str, state: str, *, wave: int = 2, members: Any = ("a", "b")) -> bytes:
        return json.dumps(
            {"key": "\x1b[31m", "revision": revisions[region], "state": state, "wave": wave,
             "waves": 2, "members": list(members), "admitted": ["a"], "failed": ["a"],
             "reason": "\x1b]0;pwned\x07 boom"}
        ).encode()  # fmt: skip

    etcd.put(layout.rollout_key("web"), gate("web", "halted"))
    etcd.put(layout.rollout_key("db"), gate("db", "complete"))
    etcd.put(layout.rollout_key("bad"), gate("bad", "halted", wave=1, members=["a", "\x1b[2J"]))
    etcd.put(layout.rollout_prefix + "eu\x1b[2J", gate("web", "halted"))
    code, out, err = gleam_client(etcd_server.endpoint, layout, "rollout", "status")
    assert_clean(code, out, err, codes=(1,))
    assert [line.split()[0] for line in out.splitlines()] == ["db", "eu\\x1b[2J", "web"]
    assert out.count("\\x1b[31m @") == 3 and out.count("\\x1b]0;pwned\\x07 boom") == 3
    code, out, err = gleam_client(etcd_server.endpoint, layout, "rollout", "promote", "web")
    assert_clean(code, out, err)
    assert f"rollout \\x1b[31m @{revisions['web']} complete" in out
    for verb, region, why in (
        ("abort", "db", f"the rollout of \\x1b[31m @{revisions['db']} is complete"),
        ("promote", "bad", "region bad has no rollout for its current task"),
    ):
        code, out, err = gleam_client(etcd_server.endpoint, layout, "rollout", verb, region)
        assert (code, out) == (1, "") and "\x1b" not in err and "Traceback" not in err, err
        assert why in err


def test_reconcile_dry_run_and_apply_show_hostile_current_values_without_crashing(
    tmp_path: Path, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, stored: dict[str, str]
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    for name in [*HOSTILE, "tiny-tables"]:
        repo.node(name, "print")
    repo.commit("take them over")
    # meta/applied is broken too: a clean error, nothing written.
    code, out, err = reconcile(etcd_server.endpoint, layout, repo.path, "--dry-run")
    assert code == 1 and "Traceback" not in out + err
    assert "meta/applied is not a valid record" in err and "nested deeper" in err
    etcd.delete(layout.applied_key)
    code, out, err = reconcile(etcd_server.endpoint, layout, repo.path, "--dry-run")
    assert_clean(code, out, err)
    for key in stored.values():
        assert f"~ {key}  print" in out, out
    assert 'value: "<not a task message: message holds an integer of more than 4300' in out
    code, out, err = reconcile(
        etcd_server.endpoint, layout, repo.path, "--dry-run", "--output", "json"
    )
    assert_clean(code, out, err)
    assert len(json.loads(out)["changes"]) == len(HOSTILE) + 1
    code, out, err = reconcile(etcd_server.endpoint, layout, repo.path)
    assert_clean(code, out, err)
    value, _meta = etcd.get(stored["huge-int"])
    assert value == b'{"Data":null,"Name":"print"}'


@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_memory_and_recursion_errors_end_a_client_command_as_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    etcd_server: EtcdServer,
    layout: keys.Layout,
    error: type[BaseException],
) -> None:
    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(client, "read_snapshot", explode)
    code = cli.main(["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, "status"])
    out, err = capsys.readouterr()
    assert code == 1 and not out and err.startswith("gleam-client: ") and err.count("\n") == 1


def test_a_hostile_apply_lock_value_is_named_in_one_clean_line(
    tmp_path: Path, etcd_server: EtcdServer, etcd: Any, layout: keys.Layout
) -> None:
    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", "print")
    repo.commit("one")
    lock = layout.lock_key
    lease = etcd.lease(60)
    for value in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"host":"\x1b[2J","pid":' + b"9" * 5000 + b"}",
    ):
        etcd.put(lock, value, lease=lease)
        code, out, err = reconcile(etcd_server.endpoint, layout, repo.path, "--lock-timeout", "0.5")
        assert code == 1 and "Traceback" not in out + err, err
        assert f"gleam-reconcile: {lock} is held by " in err and "gave up after 0.5s" in err
        assert all(len(line) < 300 for line in err.splitlines()) and "\x1b" not in err, err
    lease.revoke()
