"""gleam-client against a real etcd, with agent registrations and results written by
hand (the end-to-end tests with real agents are in test_client_agents.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gleam import cli, client, connection, keys, messages
from gleam.embedded import EtcdServer, free_port
from tests.support import ROOT


@pytest.fixture(autouse=True)
def _no_gleam_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GLEAM_* variable in the developer's shell must not steer these tests.
    for name in ("ETCD", "PREFIX", "CONFIG", "CACERT", "CERT", "KEY", "USER", "PASSWORD",
                 "PASSWORD_FILE"):  # fmt: skip
        monkeypatch.delenv(f"GLEAM_{name}", raising=False)


class Cli:
    """Runs gleam-client in-process against the test's etcd and prefix."""

    def __init__(self, endpoint: str, layout: keys.Layout, capsys: pytest.CaptureFixture[str]):
        self.endpoint = endpoint
        self.layout = layout
        self.capsys = capsys

    def __call__(self, *argv: str, connect: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        flags = ["-etcd", self.endpoint, "-prefix", self.layout.prefix] if connect else []
        code = cli.main([*flags, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> tuple[int, Any]:
        code, out, err = self("--output", "json", *argv)
        assert not err, err
        return code, json.loads(out)


@pytest.fixture
def run(etcd_server: EtcdServer, layout: keys.Layout, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(etcd_server.endpoint, layout, capsys)


def register(etcd: Any, layout: keys.Layout, agent_id: str, *regions: str) -> None:
    info = messages.AgentInfo(
        agent_id, f"host-{agent_id}", 4242, list(regions), "0.1.0", "2026-11-28T22:00:00Z", "/s"
    )
    etcd.put(layout.info_key(agent_id), info.encode())


def task_values(etcd: Any, layout: keys.Layout) -> dict[str, tuple[bytes, int]]:
    """Every task key under the prefix: value and mod_revision."""
    out = {}
    for kind in keys.Kind:
        for value, meta in etcd.get_prefix(layout.tasks_prefix(kind)):
            out[meta.key.decode()] = (value, meta.mod_revision)
    return out


# Sending ---------------------------------------------------------------------------------


def test_seed_readme_form_writes_node_and_region_in_one_transaction(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "web-1", "eu")
    code, out, err = run(
        "-target", "web-1:eu", "-fn", "config::sync", "-data", '{"path": "/etc/app.conf"}'
    )
    assert (code, err) == (0, "")
    written = task_values(etcd, layout)
    node, region = layout.node_key("web-1"), layout.region_key("eu")
    assert set(written) == {node, region}
    expected = b'{"Data":{"path":"/etc/app.conf"},"Name":"config::sync"}'
    assert written[node][0] == written[region][0] == expected
    # one transaction: both keys carry the same revision, the one printed
    revision = written[node][1]
    assert written[region][1] == revision
    assert out.splitlines() == [
        f"wrote {node} at revision {revision}",
        f"wrote {region} at revision {revision}",
    ]


def test_double_dash_flags_repeated_targets_and_commas(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "web-1", "eu")
    code, out, _ = run("--target", "web-1", "--target=eu,node/web-7", "--fn", "print")
    assert code == 0
    written = task_values(etcd, layout)
    assert set(written) == {
        layout.node_key("web-1"),
        layout.node_key("web-7"),
        layout.region_key("eu"),
    }
    # no -data means JSON null
    assert {v for v, _ in written.values()} == {b'{"Data":null,"Name":"print"}'}


def test_explicit_targets_need_no_live_agent(run: Cli, etcd: Any, layout: keys.Layout) -> None:
    code, _, err = run("-target", "node/web-9:region/nowhere", "-fn", "print", "-data", "[1, 2]")
    assert (code, err) == (0, "")
    assert set(task_values(etcd, layout)) == {
        layout.node_key("web-9"),
        layout.region_key("nowhere"),
    }


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("db-1", "'db-1' is ambiguous: it is a live agent's id and a region watched by web-1"),
        ("web-3", "'web-3' is neither a live agent's id nor a region a live agent watches"),
        ("web-1:nope", "'nope' is neither"),  # one bad target: nothing at all is written
        ("host/web-1", "not of the form node/<id> or region/<name>"),
        ("node/a b", "invalid"),
    ],
)
def test_unresolvable_targets_write_nothing(
    run: Cli, etcd: Any, layout: keys.Layout, target: str, message: str
) -> None:
    register(etcd, layout, "web-1", "eu", "db-1")
    register(etcd, layout, "db-1")
    code, out, err = run("-target", target, "-fn", "print")
    assert code == 2 and out == ""
    assert message in err
    assert err.startswith("gleam-client: -target")
    assert task_values(etcd, layout) == {}


def test_ambiguity_message_names_both_explicit_forms(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "db-1", "db-1")
    _, _, err = run("-target", "db-1", "-fn", "print")
    assert "write node/db-1 or region/db-1" in err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{bad", "-data: value is not valid JSON"),
        ("text", "-data: value is not valid JSON"),
        ("", "-data: value is not valid JSON"),
    ],
)
def test_invalid_data_is_a_clear_error_and_writes_nothing(
    run: Cli, etcd: Any, layout: keys.Layout, data: str, message: str
) -> None:
    code, out, err = run("-target", "node/a", "-fn", "print", "-data", data)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err
    assert task_values(etcd, layout) == {}


def test_data_from_a_file(run: Cli, etcd: Any, layout: keys.Layout, tmp_path: Path) -> None:
    good = tmp_path / "data.json"
    good.write_text('{"path": "/etc/app.conf", "list": [1, 2]}', encoding="utf-8")
    bad = tmp_path / "bad.json"
    bad.write_text('{"path": ', encoding="utf-8")

    code, _, err = run("-target", "node/a", "-fn", "print", "-data", f"@{bad}")
    assert code == 2 and f"-data: file '{bad}' is not valid JSON" in err
    code, _, err = run("-target", "node/a", "-fn", "print", "-data", f"@{tmp_path}/missing.json")
    assert code == 2 and "-data: cannot read file" in err and "missing.json" in err
    assert task_values(etcd, layout) == {}

    code, _, err = run("-target", "node/a", "-fn", "print", "-data", f"@{good}")
    assert (code, err) == (0, "")
    value, _ = task_values(etcd, layout)[layout.node_key("a")]
    assert messages.decode_task(value).data == {"path": "/etc/app.conf", "list": [1, 2]}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["-target", "node/a", "-fn", "../etc/passwd"],
            "-fn: function name '../etc/passwd' is invalid",
        ),
        (["-target", "node/a"], "-fn: a function name is required"),
        (["-fn", "print"], "-target: give at least one target"),
        ([], "nothing to do"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["status", "-target", "a"], "-target is for sending"),
        (["info", "extra"], "info: unexpected argument 'extra'"),
        (["status", "-wait", "3"], "-wait is for sending"),
        (["call", "node/a"], "call: expected KEY FN [DATA]"),
        (
            ["-target", "node/a", "-fn", "print", "-wait", "-1"],
            "-wait: SECONDS must not be negative",
        ),
        # A NaN or infinite wait would never end (NaN: polling etcd without a pause).
        (["-target", "node/a", "-fn", "print", "-wait", "nan"], "(got nan)"),
        (["-target", "node/a", "-fn", "print", "-wait", "inf"], "(got inf)"),
        (
            ["-target", "region/a", "-fn", "print", "-rollout", "100%", "-wait", "1e999"],
            "(got inf)",
        ),
        (["call", "node/a", "print", "-wait", "NaN"], "-wait: SECONDS must not be negative, nan"),
        # int() refuses these though str.isdigit() takes them: once a traceback.
        (
            ["-target", "region/a", "-fn", "print", "-rollout", "\u00b2"],
            "-rollout: rollout.waves[0]",
        ),
        (["-target", "region/a", "-fn", "print", "-rollout", "9" * 5000], "is neither a count"),
        (["-prefix", "gleam/", "info"], "-prefix"),
        (["-user", "u", "-password_file", "/etc/passwd", "info"], "-password_file: '/etc/passwd'"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(
    run: Cli, etcd: Any, layout: keys.Layout, argv: list[str], message: str
) -> None:
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert message in err
    assert len(err.splitlines()) == 1
    assert task_values(etcd, layout) == {}


def test_argparse_errors_exit_2(run: Cli) -> None:
    code, _, err = run("status", "--output", "yaml")
    assert code == 2 and "invalid choice" in err
    code, _, err = run("-wait", "soon")
    assert code == 2 and "-wait" in err


def test_etcd_unreachable_is_one_line_naming_the_endpoint(run: Cli, layout: keys.Layout) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    for argv in (["status"], ["info"], ["-target", "node/a", "-fn", "print"]):
        code, out, err = run("-etcd", endpoint, "-prefix", layout.prefix, *argv, connect=False)
        assert code == 1 and out == ""
        assert err.startswith(f"gleam-client: cannot reach etcd at {endpoint} (")
        assert len(err.splitlines()) == 1 and "Traceback" not in err


# The original's subcommands --------------------------------------------------------------


def test_call_with_a_full_key_or_a_short_one(run: Cli, etcd: Any, layout: keys.Layout) -> None:
    code, out, _ = run("call", layout.node_key("web-1"), "config::sync", '{"path": "/x"}')
    assert code == 0
    code, _, _ = run("call", "region/eu", "print")
    assert code == 0
    written = task_values(etcd, layout)
    assert written[layout.node_key("web-1")][0] == b'{"Data":{"path":"/x"},"Name":"config::sync"}'
    assert written[layout.region_key("eu")][0] == b'{"Data":null,"Name":"print"}'
    assert (
        out
        == f"wrote {layout.node_key('web-1')} at revision {written[layout.node_key('web-1')][1]}\n"
    )


@pytest.mark.parametrize(
    ("key_of", "message"),
    [
        (lambda p: "/elsewhere/node/web-1", "is not a task key under"),
        (lambda p: f"{p}/info/web-1", "is not a task key under"),
        (lambda p: f"{p}/node/../x", "is not a task key under"),
        (lambda p: "host/web-1", "call: key 'host/web-1'"),
    ],
)
def test_call_refuses_keys_that_are_not_task_keys(
    run: Cli, etcd: Any, layout: keys.Layout, key_of: Any, message: str
) -> None:
    code, _, err = run("call", key_of(layout.prefix), "print", "{}")
    assert code == 2 and message in err
    assert task_values(etcd, layout) == {}


def test_call_refuses_invalid_data(run: Cli, etcd: Any, layout: keys.Layout) -> None:
    code, _, err = run("call", "node/a", "print", "{nope")
    assert code == 2 and "call DATA: value is not valid JSON" in err
    assert task_values(etcd, layout) == {}


def test_info_node_and_region_list_keys_and_values(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "web-1", "eu", "web")
    register(etcd, layout, "db-1")
    etcd.put(layout.info_key("broken"), b"not json")  # named invalid, not fatal
    assert run("-target", "node/web-1:region/eu", "-fn", "print", "-data", '"hi"')[0] == 0
    assert run("call", "node/db-1", "etcd")[0] == 0

    code, out, _ = run("info")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["KEY", "REGISTRATION"]
    assert [line.split()[0] for line in lines[1:]] == [
        layout.info_key("db-1"),
        layout.info_key("web-1"),
        layout.info_key("broken"),
    ]
    assert json.loads(lines[2].split(None, 1)[1])["regions"] == ["eu", "web"]
    assert lines[3].split(None, 1)[1].startswith("(invalid) registration is not")

    code, out, _ = run("node")
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    assert code == 0
    assert [(r[0], r[2]) for r in rows] == [
        (layout.node_key("db-1"), '{"Data":null,"Name":"etcd"}'),
        (layout.node_key("web-1"), '{"Data":"hi","Name":"print"}'),
    ]
    code, out, _ = run("region")
    assert code == 0 and out.splitlines()[1].split()[0] == layout.region_key("eu")

    code, doc = run.json("info")
    assert code == 0 and [a["id"] for a in doc["agents"]] == ["db-1", "web-1", "broken"]
    assert [a["invalid"] is None for a in doc["agents"]] == [True, True, False]
    assert doc["agents"][2]["invalid"]["key"] == layout.info_key("broken")
    code, doc = run.json("node")
    assert [(t["target"], t["name"], t["data"]) for t in doc["tasks"]] == [
        ("node/db-1", "etcd", None),
        ("node/web-1", "print", "hi"),
    ]


class Recording:
    """A real pyetcd client (what gleam.client and the CLI are given) that records the
    gets and ranges it is asked for, directly or through gleam.etcdapi: (method, key)."""

    READS = ("get", "get_response", "get_prefix", "get_prefix_response", "get_range",
             "transaction")  # fmt: skip

    def __init__(self, etcd: Any) -> None:
        self._etcd = etcd
        self.reads: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._etcd, name)
        if name not in self.READS:
            return found

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.reads.append((name, str(args[0]) if args else ""))
            return found(*args, **kwargs)

        return recorded


def test_info_reads_the_registrations_once_and_still_names_the_invalid_one(
    run: Cli, etcd: Any, layout: keys.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(etcd, layout, "web-1", "eu")
    etcd.put(layout.info_key("broken"), b'{"id": "broken", "pid": "many"}')
    recordings: list[Recording] = []

    def connect(settings: connection.Settings) -> Recording:
        recordings.append(Recording(real_connect(settings)))
        return recordings[-1]

    real_connect = connection.connect_reachable
    monkeypatch.setattr(connection, "connect_reachable", connect)
    code, out, err = run("info")
    assert (code, err) == (0, "")
    assert [r.reads for r in recordings] == [[("get_prefix_response", layout.info_prefix)]]
    lines = out.splitlines()
    assert [line.split(None, 1)[0] for line in lines[1:]] == [
        layout.info_key("web-1"),
        layout.info_key("broken"),
    ]
    assert json.loads(lines[1].split(None, 1)[1])["id"] == "web-1"
    assert lines[2].split(None, 2)[1:] == [
        "(invalid)",
        "registration is missing or has a bad field: "
        "invalid literal for int() with base 10: 'many'",
    ]
    code, doc = run.json("info")
    assert recordings[-1].reads == [("get_prefix_response", layout.info_prefix)]
    assert [(a["id"], a["invalid"] and a["invalid"]["key"]) for a in doc["agents"]] == [
        ("web-1", None),
        ("broken", layout.info_key("broken")),
    ]
    assert doc["agents"][1]["invalid"]["error"] == lines[2].split(None, 2)[2]


def test_send_json_output(run: Cli, layout: keys.Layout) -> None:
    code, doc = run.json("-target", "node/a:region/b", "-fn", "print", "-data", "{}")
    assert code == 0
    assert doc["version"] == 1 and doc["name"] == "print" and doc["data"] == {}
    assert doc["keys"] == [layout.node_key("a"), layout.region_key("b")]
    assert isinstance(doc["revision"], int)


def test_wait_with_no_live_watcher_fails(run: Cli, layout: keys.Layout) -> None:
    code, out, _ = run("-target", "node/nobody", "-fn", "print", "-wait", "0.2")
    assert code == 1
    assert f"{layout.node_key('nobody')}: no live agent watches this key" in out


def test_wait_reports_an_agent_that_does_not_answer(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "mute", "eu")
    code, out, _ = run("-target", "eu", "-fn", "print", "-wait", "0.3")
    assert code == 1
    (row,) = out.splitlines()[2:]
    assert row.split()[:4] == ["mute", layout.region_key("eu"), "no", "answer"]


def test_wait_reports_a_garbage_result_record_as_invalid_naming_its_key(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    """A result key holding garbage is not "no answer" after the whole wait: it is
    reported at once as invalid, with the record's key, and fails the send."""
    register(etcd, layout, "garbled", "eu")
    result_key = layout.result_key("garbled", keys.Target(keys.Kind.REGION, "eu"))
    etcd.put(result_key, b"\xff not a result")
    code, out, _ = run("-target", "eu", "-fn", "print", "-wait", "60")
    assert code == 1
    (row,) = out.splitlines()[2:]
    assert row.split()[:4] == ["garbled", layout.region_key("eu"), "invalid", "(invalid)"]
    assert result_key in row
    code, doc = run.json("-target", "eu", "-fn", "print", "-wait", "60")
    assert code == 1
    (report,) = doc["reports"]
    assert report["outcome"] == "invalid" and report["invalid"].startswith(result_key + ": ")


# Connection settings from the environment and a config file ------------------------------


def test_connection_from_environment_and_config_file(
    run: Cli,
    etcd: Any,
    layout: keys.Layout,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("GLEAM_ETCD", run.endpoint)
    monkeypatch.setenv("GLEAM_PREFIX", layout.prefix)
    assert run("call", "node/from-env", "print", connect=False)[0] == 0
    monkeypatch.delenv("GLEAM_ETCD")
    monkeypatch.delenv("GLEAM_PREFIX")
    config = tmp_path / "gleam.yaml"
    config.write_text(f"etcd: [{run.endpoint}]\nprefix: {layout.prefix}\n", encoding="utf-8")
    assert run("-config", str(config), "call", "node/from-config", "print", connect=False)[0] == 0
    assert set(task_values(etcd, layout)) == {
        layout.node_key("from-env"),
        layout.node_key("from-config"),
    }


# Status with hand-written records ------------------------------------------------------


def test_status_reads_one_snapshot_of_the_prefix(run: Cli, etcd: Any, layout: keys.Layout) -> None:
    register(etcd, layout, "a", "eu")
    register(etcd, layout, "b", "eu")
    assert run("call", "region/eu", "job")[0] == 0
    (entry,) = client.list_tasks(etcd, layout, keys.Kind.REGION)
    etcd.put(
        layout.result_key("a", entry.target),
        messages.Result("a", entry.key, entry.revision, "job", True, result=1).encode(),
    )
    code, out, _ = run("status")
    assert code == 2  # b has not answered
    assert "pending" in out and "not run yet" in out
    etcd.put(
        layout.result_key("b", entry.target),
        messages.Result("b", entry.key, entry.revision, "job", False, error="boom\nx").encode(),
    )
    code, doc = run.json("status")
    assert code == 1 and doc["exit_code"] == 1
    assert [(r["agent"], r["state"]) for r in doc["tasks"][0]["agents"]] == [
        ("a", "ok"),
        ("b", "failed"),
    ]
    etcd.put(
        layout.result_key("b", entry.target),
        messages.Result("b", entry.key, entry.revision, "job", True).encode(),
    )
    assert run("status")[0] == 0


def test_status_names_a_garbage_result_and_registration_invalid_and_exits_1(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "a", "eu")
    register(etcd, layout, "b", "eu")
    assert run("call", "region/eu", "job")[0] == 0
    (entry,) = client.list_tasks(etcd, layout, keys.Kind.REGION)
    ok = messages.Result("a", entry.key, entry.revision, "job", True, result=1)
    etcd.put(layout.result_key("a", entry.target), ok.encode())
    result_key = layout.result_key("b", entry.target)
    etcd.put(result_key, b"\x1b[2J garbage")  # b's record: once shown as pending
    code, out, _ = run("status")
    assert code == 1  # a failure, not "2: still pending"
    row = next(line for line in out.splitlines() if line.split()[4:5] == ["b"])
    assert row.split()[5:7] == ["invalid", "(invalid)"]
    assert f"{result_key}: result is not" in row and "\\x1b[2J" not in row  # no raw bytes
    assert out.rstrip().endswith("0 pending, 0 gone, 0 unwatched, 1 invalid")
    code, doc = run.json("status")
    assert code == 1 and doc["exit_code"] == 1
    rows = {r["agent"]: r for r in doc["tasks"][0]["agents"]}
    assert (rows["a"]["state"], rows["b"]["state"]) == ("ok", "invalid")
    assert rows["b"]["invalid"]["key"] == result_key and rows["b"]["live"]

    # Fixed by the agent's next result: a garbage registration still fails status.
    etcd.put(result_key, messages.Result("b", entry.key, entry.revision, "job", True).encode())
    assert run("status")[0] == 0
    info_key = layout.info_key("c")
    etcd.put(info_key, b'{"id": "c", "regions": "eu"}')
    code, out, _ = run("status")
    assert code == 1 and "AGENTS (2 live, 1 invalid)" in out
    row = next(line for line in out.splitlines() if line.startswith("c "))
    assert f"(invalid) {info_key}: registration " in row
    code, doc = run.json("status")
    assert code == 1 and doc["summary"]["invalid_registrations"] == 1
    assert [(a["id"], a["invalid"] and a["invalid"]["key"]) for a in doc["agents"]] == [
        ("a", None),
        ("b", None),
        ("c", info_key),
    ]


# As a real process ----------------------------------------------------------------------


def test_gleam_client_runs_as_a_process(etcd_server: EtcdServer, layout: keys.Layout) -> None:
    env = {"PATH": "/usr/bin:/bin", "GLEAM_ETCD": etcd_server.endpoint}
    base = [sys.executable, "-m", "gleam.cli", "-prefix", layout.prefix]
    sent = subprocess.run(
        [*base, "-target", "node/p1", "-fn", "print", "-data", '{"a": 1}'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith(f"wrote {layout.node_key('p1')} at revision ")
    listed = subprocess.run(
        [*base, "node"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert listed.returncode == 0 and '{"Data":{"a":1},"Name":"print"}' in listed.stdout
    bad = subprocess.run(
        [*base, "-target", "x", "-fn", "print"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'x' is neither" in bad.stderr


def test_help_exits_0_and_documents_targets_and_exit_codes(run: Cli) -> None:
    code, out, _ = run("--help", connect=False)
    assert code == 0
    for text in ("-target", "node/ID, region/NAME", "exit codes:", "status", "call KEY FN [DATA]"):
        assert text in out


def test_wait_json_output_has_reports_and_unwatched_keys(
    run: Cli, etcd: Any, layout: keys.Layout
) -> None:
    register(etcd, layout, "mute", "eu")
    code, doc = run.json("-target", "eu:node/nobody", "-fn", "print", "-wait", "0.2")
    assert code == 1
    assert [(r["agent"], r["key"], r["outcome"]) for r in doc["reports"]] == [
        ("mute", layout.region_key("eu"), "pending")
    ]
    assert doc["unwatched"] == [layout.node_key("nobody")]
    assert doc["reports"][0]["revision"] == doc["revision"]


def test_data_from_standard_input(
    run: Cli, etcd: Any, layout: keys.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"from": "stdin"}'))
    assert run("-target", "node/a", "-fn", "print", "-data", "@-")[0] == 0
    value, _ = task_values(etcd, layout)[layout.node_key("a")]
    assert messages.decode_task(value).data == {"from": "stdin"}
    monkeypatch.setattr("sys.stdin", io.StringIO("nope"))
    code, _, err = run("-target", "node/b", "-fn", "print", "-data", "@-")
    assert code == 2 and "-data: standard input is not valid JSON" in err


def test_data_that_is_not_utf8_is_a_usage_error_from_a_file_or_standard_input(
    run: Cli, etcd: Any, layout: keys.Layout, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'"\xff"')
    code, _, err = run("-target", "node/a", "-fn", "print", "-data", f"@{latin}")
    assert code == 2 and f"-data: file {str(latin)!r} is not UTF-8 text" in err
    # Standard input as a UTF-8 locale gives it (strict): once a traceback.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'"\xff"'), encoding="utf-8"))
    code, _, err = run("call", "node/a", "print", "@-")
    assert code == 2 and "call DATA: standard input is not UTF-8 text" in err
    assert task_values(etcd, layout) == {}


def test_data_past_what_a_task_can_hold_is_not_read_to_the_end(
    run: Cli, etcd: Any, layout: keys.Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """@/dev/zero or an endless pipe once read until memory ran out."""
    code, _, err = run("-target", "node/a", "-fn", "print", "-data", "@/dev/zero")
    assert code == 2 and f"-data: file '/dev/zero' holds over {cli.MAX_DATA_TEXT} " in err
    monkeypatch.setattr("sys.stdin", io.StringIO(" " * cli.MAX_DATA_TEXT + "1"))
    code, _, err = run("call", "node/a", "print", "@-")
    assert code == 2 and "call DATA: standard input holds over" in err
    assert task_values(etcd, layout) == {}
    # Indented data up to the bound is read whole: what the task holds is what counts.
    monkeypatch.setattr("sys.stdin", io.StringIO(" " * (cli.MAX_DATA_TEXT - 1) + "1"))
    assert run("-target", "node/a", "-fn", "print", "-data", "@-")[0] == 0


def test_empty_listings_print_nothing_and_say_so_on_stderr(run: Cli, layout: keys.Layout) -> None:
    for command, where in (("info", "info/"), ("node", "node/"), ("region", "region/")):
        code, out, err = run(command)
        assert (code, out) == (0, "")
        assert (
            f"no {'live agent' if command == 'info' else 'task key'} under {layout.prefix}/{where}"
            in err
        )
    code, doc = run.json("info")
    assert doc == {"version": 1, "agents": []}
