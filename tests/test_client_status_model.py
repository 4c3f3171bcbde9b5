"""The status model and its rendering: pure tests over hand-built snapshots, no etcd."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gleam import (
    client,
    client_render,
    invalid_records,
    keys,
    messages,
    provenance,
    status,
)

LAYOUT = keys.Layout("/gleam")
NOW = datetime(2026, 11, 28, 23, 0, 0, tzinfo=UTC)


def agent(agent_id: str, *regions: str) -> messages.AgentInfo:
    return messages.AgentInfo(
        agent_id, f"host-{agent_id}", 100, list(regions), "0.1.0", "2026-11-28T22:00:00Z", "/s"
    )


def task(target: keys.Target, revision: int, name: str = "job") -> client.TaskEntry:
    value = messages.Task(name, {"n": revision}).encode()
    return client.TaskEntry(LAYOUT.task_key(target), target, revision, value)


def result(
    agent_id: str, target: keys.Target, revision: int, *, ok: bool = True, error: str | None = None
) -> messages.Result:
    return messages.Result(
        agent=agent_id,
        key=LAYOUT.task_key(target),
        revision=revision,
        name="job",
        ok=ok,
        result={"done": agent_id} if ok else None,
        error=error,
    )


EU = keys.Target.region("eu")


def snapshot(
    agents: list[messages.AgentInfo],
    tasks: list[client.TaskEntry],
    results: list[messages.Result],
) -> client.Snapshot:
    return client.Snapshot(
        revision=99, tasks=tuple(tasks), agents=tuple(agents), results=tuple(results), meta={}
    )


def build(snap: client.Snapshot) -> status.FleetStatus:
    return status.build(snap, layout=LAYOUT, now=NOW)


FLEET = [agent("a-ok", "eu"), agent("b-fail", "eu"), agent("c-wait", "eu")]
MIXED = snapshot(
    FLEET,
    [task(EU, 10)],
    [
        result("a-ok", EU, 10),
        result("b-fail", EU, 10, ok=False, error="\nboom: line 1\nstack traceback: ..."),
        result("c-wait", EU, 7),  # ran an older revision only
        result("d-gone", EU, 10),  # not registered any more
    ],
)


def states(fleet: status.FleetStatus) -> list[tuple[str, str, str]]:
    return [(t.key, r.agent, r.state.value) for t in fleet.tasks for r in t.rows]


def test_rows_say_ok_failed_pending_and_gone() -> None:
    fleet = build(MIXED)
    assert states(fleet) == [
        ("/gleam/region/eu", "a-ok", "ok"),
        ("/gleam/region/eu", "b-fail", "failed"),
        ("/gleam/region/eu", "c-wait", "pending"),
        ("/gleam/region/eu", "d-gone", "gone"),
    ]
    rows = {r.agent: r for r in fleet.tasks[0].rows}
    assert rows["b-fail"].error_line == "boom: line 1"
    assert rows["d-gone"].outcome is client.Outcome.OK and not rows["d-gone"].live
    assert fleet.tasks[0].state is status.TaskState.FAILED
    assert fleet.counts == status.Counts(ok=1, failed=1, pending=1, gone=1, unwatched=0)


@pytest.mark.parametrize(
    ("results", "exit_code"),
    [
        ([result("a", EU, 10), result("b", EU, 11)], 0),  # a later revision also answers
        ([result("a", EU, 10), result("b", EU, 10, ok=False, error="x")], 1),
        ([result("a", EU, 10)], 2),  # b has not answered
        ([result("a", EU, 10, ok=False, error="x")], 1),  # failure wins over pending
        ([result("a", EU, 10), result("b", EU, 9)], 2),  # b ran an older revision only
        # departed agents count for nothing, even when they failed
        ([result("a", EU, 10), result("b", EU, 10), result("z", EU, 10, ok=False)], 0),
    ],
)
def test_exit_code(results: list[messages.Result], exit_code: int) -> None:
    fleet = build(snapshot([agent("a", "eu"), agent("b", "eu")], [task(EU, 10)], results))
    assert fleet.exit_code == exit_code


def test_a_key_no_live_agent_watches_is_unwatched_and_does_not_fail_status() -> None:
    fleet = build(snapshot([agent("a", "eu")], [task(keys.Target.node("gone-host"), 5)], []))
    assert fleet.tasks[0].state is status.TaskState.UNWATCHED
    assert fleet.exit_code == 0
    assert fleet.counts.unwatched == 1


def test_node_keys_target_only_their_agent() -> None:
    node = keys.Target.node("a")
    fleet = build(snapshot([agent("a", "eu"), agent("b", "eu")], [task(node, 3)], []))
    assert states(fleet) == [("/gleam/node/a", "a", "pending")]


def test_an_invalid_stored_message_is_shown_not_fatal() -> None:
    bad = client.TaskEntry("/gleam/node/a", keys.Target.node("a"), 4, b"not json")
    fleet = build(snapshot([agent("a")], [bad], []))
    assert fleet.tasks[0].function is None
    assert "not JSON" in (fleet.tasks[0].invalid or "")
    assert "(invalid)" in client_render.status_text(fleet)


# Records that cannot be decoded (gleam.invalid_records) -------------------------------------


def unreadable(*items: tuple[str, bytes]) -> tuple[invalid_records.InvalidRecord, ...]:
    return invalid_records.decode(items, LAYOUT).invalid


GARBAGE_RESULTS = unreadable(
    ("/gleam/result/c-wait/region/eu", b"\xff garbage"),  # live, watching: was pending
    ("/gleam/result/e-left/region/eu", b"{}"),  # not registered
    ("/gleam/result/a-ok/node/nowhere", b"[]"),  # for a key that holds no task
)


def test_unreadable_records_are_found_by_key_and_good_ones_and_other_keys_left_alone() -> None:
    good = result("a-ok", EU, 10).encode()
    found = unreadable(
        ("/gleam/result/a-ok/region/eu", good),
        ("/gleam/result/b/region/eu", b"null"),
        ("/gleam/result/b", b"not a record key"),
        ("/gleam/info/a-ok", agent("a-ok").encode()),
        ("/gleam/info/x\x1b", b'{"id": 1'),
        ("/gleam/node/b", b"a task key: not a record"),
    )
    assert [(r.key, r.kind.value, r.agent, r.task_key) for r in found] == [
        ("/gleam/info/x\x1b", "registration", "x\x1b", None),
        ("/gleam/result/b/region/eu", "result", "b", "/gleam/region/eu"),
    ]
    assert all(r.error for r in found)


def test_a_result_stored_under_another_agents_or_tasks_key_is_invalid_not_believed() -> None:
    """An agent may write only under its own result prefix; a record there naming another
    agent (or another task) would answer for it: b-fail's failure hidden by an ok."""
    forged = result("b-fail", EU, 10).encode()
    other_task = result("a-ok", keys.Target.node("a-ok"), 10).encode()
    items = [
        ("/gleam/result/b-fail/region/eu", result("b-fail", EU, 10, ok=False).encode()),
        ("/gleam/result/z-forger/region/eu", forged),
        ("/gleam/result/a-ok/region/eu", other_task),
    ]
    decoded = invalid_records.decode(items, LAYOUT)
    assert [(r.agent, r.ok) for r in decoded.results] == [("b-fail", False)]
    assert [(r.key, r.agent) for r in decoded.invalid] == [
        ("/gleam/result/a-ok/region/eu", "a-ok"),
        ("/gleam/result/z-forger/region/eu", "z-forger"),
    ]
    assert "result is for agent 'b-fail' at '/gleam/region/eu', not 'z-forger'" in (
        decoded.invalid[1].error
    )
    assert "at '/gleam/node/a-ok', not 'a-ok' at '/gleam/region/eu'" in decoded.invalid[0].error


def test_an_unreadable_result_is_an_invalid_row_and_fails_status_where_it_was_pending() -> None:
    fleet = status.build(MIXED, layout=LAYOUT, now=NOW, invalid=GARBAGE_RESULTS)
    assert states(fleet) == [
        ("/gleam/region/eu", "a-ok", "ok"),
        ("/gleam/region/eu", "b-fail", "failed"),
        ("/gleam/region/eu", "c-wait", "invalid"),
        ("/gleam/region/eu", "d-gone", "gone"),
        ("/gleam/region/eu", "e-left", "invalid"),
    ]
    rows = {r.agent: r for r in fleet.tasks[0].rows}
    assert rows["c-wait"].live and not rows["e-left"].live
    assert rows["c-wait"].invalid == GARBAGE_RESULTS[1]
    assert fleet.counts == status.Counts(ok=1, failed=1, pending=0, gone=1, unwatched=0, invalid=2)
    text = client_render.status_text(fleet)
    line = next(x for x in text.splitlines() if " c-wait " in x)
    assert line.split()[4:7] == ["c-wait", "invalid", "(invalid)"]
    assert "/gleam/result/c-wait/region/eu: result is not" in line
    assert text.endswith("1 ok, 1 failed, 0 pending, 1 gone, 0 unwatched, 2 invalid")
    doc = json.loads(client_render.to_json(client_render.status_document(fleet)))
    (row,) = [r for r in doc["tasks"][0]["agents"] if r["agent"] == "c-wait"]
    assert (row["state"], row["outcome"], row["live"]) == ("invalid", "pending", True)
    assert row["invalid"]["key"] == "/gleam/result/c-wait/region/eu"
    assert doc["summary"]["invalid"] == 2 and doc["exit_code"] == 1


@pytest.mark.parametrize(
    ("bad", "exit_code"),
    [
        # c-wait's record is garbage: invalid, not pending, and a failure
        (("/gleam/result/c/region/eu", b"garbage"), 1),
        # a departed agent's garbage counts too: nothing readable should be there
        (("/gleam/result/z/region/eu", b"garbage"), 1),
        (("/gleam/info/y", b"garbage"), 1),  # a registration that cannot be read
        (("/gleam/result/a/node/nowhere", b"garbage"), 2),  # no such task: c still pending
    ],
)
def test_an_unreadable_record_fails_status_wherever_it_is_shown(
    bad: tuple[str, bytes], exit_code: int
) -> None:
    snap = snapshot([agent("a", "eu"), agent("c", "eu")], [task(EU, 10)], [result("a", EU, 10)])
    assert status.build(snap, layout=LAYOUT, now=NOW).exit_code == 2
    fleet = status.build(snap, layout=LAYOUT, now=NOW, invalid=unreadable(bad))
    assert fleet.exit_code == exit_code


def test_an_unreadable_registration_is_listed_with_the_agents_by_key() -> None:
    bad = unreadable(("/gleam/info/web-9", b'{"id": "web-9", "pid": "many"}'))
    fleet = status.build(MIXED, layout=LAYOUT, now=NOW, invalid=bad)
    assert fleet.invalid_registrations == bad and fleet.exit_code == 1
    text = client_render.status_text(fleet)
    assert "AGENTS (3 live, 1 invalid)" in text
    line = next(x for x in text.splitlines() if x.startswith("web-9 "))
    assert "(invalid) /gleam/info/web-9: registration " in line
    assert text.endswith("unwatched, 1 invalid registration(s)")
    doc = json.loads(client_render.to_json(client_render.status_document(fleet)))
    assert [a["invalid"] for a in doc["agents"][:3]] == [None, None, None]
    assert doc["agents"][3]["id"] == "web-9"
    assert doc["agents"][3]["invalid"]["key"] == "/gleam/info/web-9"
    assert doc["summary"]["invalid_registrations"] == 1


def test_uptime_comes_from_started_and_now() -> None:
    fleet = build(snapshot([agent("a")], [], []))
    assert fleet.agents[0].up_seconds == 3600.0
    odd = messages.AgentInfo("b", "h", 1, [], "v", "yesterday", "/s")
    assert build(snapshot([odd], [], [])).agents[0].up_seconds is None


def test_status_text_is_aligned_and_names_every_row() -> None:
    text = client_render.status_text(build(MIXED))
    lines = text.splitlines()
    assert lines[0].startswith("prefix /gleam  etcd revision 99")
    header = next(line for line in lines if line.startswith("KEY"))
    rows = [line for line in lines if line.startswith("/gleam/region/eu")]
    assert len(rows) == 4
    # columns line up: every row has its STATE cell where the header has STATE
    column = header.index("STATE")
    assert [row[column:].split()[0] for row in rows] == ["ok", "failed", "pending", "gone"]
    assert "boom: line 1" in rows[1] and "stack traceback" not in text
    assert "last ran rev 7" in rows[2]
    assert "last: ok at rev 10" in rows[3]
    agents_header = next(line for line in lines if line.startswith("ID"))
    assert agents_header.split() == ["ID", "HOST", "REGIONS", "VERSION", "UP", "SINCE"]
    assert any("host-a-ok" in line and "(up 1h)" in line for line in lines)
    assert lines[-1] == "1 ok, 1 failed, 1 pending, 1 gone, 0 unwatched"
    assert "\033[" not in text


def test_status_text_colours_states_only_when_asked() -> None:
    text = client_render.status_text(build(MIXED), colour=True)
    assert "\033[31mfailed" in text and "\033[32mok" in text


def test_status_json_has_the_same_content_and_a_version() -> None:
    fleet = build(MIXED)
    doc = json.loads(client_render.to_json(client_render.status_document(fleet)))
    assert doc["version"] == status.SCHEMA_VERSION
    assert doc["exit_code"] == 1
    counts = {"ok": 1, "failed": 1, "pending": 1, "gone": 1, "unwatched": 0, "held": 0}
    counts |= {"invalid": 0, "invalid_registrations": 0}
    assert doc["summary"] == counts
    assert [a["id"] for a in doc["agents"]] == ["a-ok", "b-fail", "c-wait"]
    assert doc["agents"][0]["up_seconds"] == 3600.0
    (eu,) = doc["tasks"]
    assert eu["key"] == "/gleam/region/eu" and eu["function"] == "job"
    assert eu["revision"] == 10 and eu["commit"] is None and eu["state"] == "failed"
    rows = {r["agent"]: r for r in eu["agents"]}
    assert rows["a-ok"]["result"] == {"done": "a-ok"}
    assert rows["b-fail"]["error_line"] == "boom: line 1"
    assert rows["c-wait"]["state"] == "pending" and rows["c-wait"]["result_revision"] == 7
    assert rows["d-gone"]["live"] is False and rows["d-gone"]["outcome"] == "ok"


def test_empty_fleet_renders() -> None:
    fleet = build(snapshot([], [], []))
    text = client_render.status_text(fleet)
    assert "AGENTS: none live" in text and "TASKS: none" in text
    assert fleet.exit_code == 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (0, "0s"), (59.9, "59s"), (61, "1m1s"), (3725, "1h2m"), (90061, "1d1h")],
)
def test_age(seconds: float | None, text: str) -> None:
    assert client_render.age(seconds) == text


def test_table_pads_all_but_the_last_column() -> None:
    assert client_render.table(["A", "BB"], [["xxx", "y"], ["z", "long"]]) == [
        "A    BB",
        "xxx  y",
        "z    long",
    ]


def test_wait_reports_text() -> None:
    reports = [
        client.Report("a", "/gleam/region/eu", 10, client.Outcome.OK, result("a", EU, 10)),
        client.Report(
            "b",
            "/gleam/region/eu",
            10,
            client.Outcome.FAILED,
            result("b", EU, 10, ok=False, error="boom\nmore"),
        ),
        client.Report("c", "/gleam/region/eu", 10, client.Outcome.PENDING, None),
    ]
    text = client_render.reports_text(reports, timeout=2.5, unwatched=["/gleam/node/x"])
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["a", "/gleam/region/eu", "ok"] and '{"done":"a"}' in lines[1]
    assert lines[2].endswith("boom") and "failed" in lines[2]
    assert "no answer" in lines[3] and "within 2.5s" in lines[3]
    assert lines[4] == "/gleam/node/x: no live agent watches this key"


# Provenance: the reconciler's records under <prefix>/meta/ --------------------------------

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def applied_record(*history: dict[str, object], commit: str | None = SHA) -> bytes:
    return json.dumps({"version": 1, "commit": commit, "history": list(history)}).encode()


GIT_APPLY = {"source": "commit", "commit": SHA, "time": "2026-11-28T22:30:00Z", "keys": 2}
TREE_APPLY = {"source": "worktree", "commit": SHA, "time": "2026-11-28T22:40:00Z", "keys": 2}
NODE_A = keys.Target.node("a")


def meta(
    applied: bytes | None, *owned: str, value: bytes = b"", revision: int = 15
) -> dict[str, client.Stored]:
    out = {f"/gleam/meta/owned/{path}": client.Stored(value, revision) for path in owned}
    if applied is not None:
        out["/gleam/meta/applied"] = client.Stored(applied, 20)
    return out


FROM_SHA = json.dumps({"source": "commit", "commit": SHA}).encode()
FROM_TREE = json.dumps({"source": "worktree"}).encode()


@pytest.mark.parametrize(
    ("stored_meta", "key_revision", "expected"),
    [
        # owned, written with the task value (same revision): that write's commit
        (meta(applied_record(GIT_APPLY), "node/a", value=FROM_SHA), 15,
         provenance.Provenance(SHA, "reconciler")),
        # the commit is the one that wrote this key, not the last one applied
        (meta(applied_record({**GIT_APPLY, "commit": OLD_SHA}), "node/a", value=FROM_SHA), 15,
         provenance.Provenance(SHA, "reconciler")),
        # owned but changed after the reconciler wrote it (by hand)
        (meta(applied_record(GIT_APPLY), "node/a", value=FROM_SHA), 25,
         provenance.Provenance(None, "reconciler")),
        # written by a work-tree apply: no commit to name
        (meta(applied_record(TREE_APPLY, GIT_APPLY), "node/a", value=FROM_TREE), 15,
         provenance.Provenance(None, "reconciler")),
        # not owned: sent by hand
        (meta(applied_record(GIT_APPLY)), 15, None),
        # records this reader does not understand are ignored, never fatal
        (meta(b"not json", "node/a", value=b"not json"), 15,
         provenance.Provenance(None, "reconciler")),
        (meta(json.dumps({"version": 99}).encode(), "node/a"), 15,
         provenance.Provenance(None, "reconciler")),
        (meta(None, "node/a", value=FROM_SHA), 15, provenance.Provenance(SHA, "reconciler")),
    ],
)  # fmt: skip
def test_provenance(
    stored_meta: dict[str, client.Stored], key_revision: int, expected: provenance.Provenance | None
) -> None:
    origin = provenance.read(stored_meta, [task(NODE_A, key_revision)], LAYOUT)
    assert origin.keys.get("/gleam/node/a") == expected


def test_status_shows_commit_owner_and_the_last_apply() -> None:
    snap = client.Snapshot(
        revision=30,
        tasks=(task(NODE_A, 15), task(keys.Target.node("b"), 25), task(keys.Target.node("c"), 5)),
        agents=(),
        results=(),
        # a and b were written at revision 15; b was changed by hand at 25
        meta=meta(applied_record(GIT_APPLY), "node/a", "node/b", value=FROM_SHA),
    )
    fleet = build(snap)
    assert fleet.applied_commit == SHA and fleet.applied_time == "2026-11-28T22:30:00Z"
    text = client_render.status_text(fleet)
    assert f"reconciler applied {SHA[:12]} at 2026-11-28T22:30:00Z" in text.splitlines()[0]
    commits = {
        line.split()[0]: line.split()[3]
        for line in text.splitlines()
        if line.startswith("/gleam/node/")
    }
    assert commits == {"/gleam/node/a": SHA[:12], "/gleam/node/b": "?", "/gleam/node/c": "-"}
    doc = client_render.status_document(fleet)
    assert [(t["commit"], t["owner"]) for t in doc["tasks"]] == [
        (SHA, "reconciler"),
        (None, "reconciler"),
        (None, None),
    ]
    assert doc["applied_commit"] == SHA


agent_ids = st.sampled_from(["a", "b", "c", "d"])
results_strategy = st.lists(
    st.builds(
        lambda agent_id, revision, ok: result(
            agent_id, EU, revision, ok=ok, error=None if ok else "x"
        ),
        agent_ids,
        st.integers(min_value=1, max_value=20),
        st.booleans(),
    ),
    max_size=6,
)


@given(live=st.sets(agent_ids), results=results_strategy, revision=st.integers(1, 20))
def test_status_agrees_with_judge_for_live_agents(
    live: set[str], results: list[messages.Result], revision: int
) -> None:
    agents = [agent(a, "eu") for a in sorted(live)]
    fleet = build(snapshot(agents, [task(EU, revision)], results))
    reports = client.judge({LAYOUT.task_key(EU): revision}, agents, results, LAYOUT)
    live_rows = [(r.agent, r.state.value) for r in fleet.tasks[0].rows if r.live]
    assert live_rows == [(r.agent, r.outcome.value) for r in reports]
    outcomes = {r.outcome for r in reports}
    expected = (
        1 if client.Outcome.FAILED in outcomes else 2 if client.Outcome.PENDING in outcomes else 0
    )
    assert fleet.exit_code == expected
    gone = {r.agent for r in fleet.tasks[0].rows if not r.live}
    assert gone == {r.agent for r in results} - live
    # rendering never fails and shows one row per agent
    assert len(client_render.status_text(fleet).splitlines()) >= len(fleet.tasks[0].rows)


def test_text_output_shows_control_characters_from_etcd_escaped() -> None:
    # Anyone who can write to etcd picks these strings: they must not repaint a terminal.
    hostile = messages.AgentInfo("a-ok", "\x1b[2J", 1, ["eu"], "\u202e1.0", "?", "/s")
    fleet = build(
        snapshot(
            [hostile],
            [task(EU, 10)],
            [result("a-ok", EU, 10, ok=False, error="\x1b]0;pwned\x07 boom\nstack")],
        )
    )
    text = client_render.status_text(fleet)
    assert all(line.isprintable() for line in text.splitlines()), text
    assert "\\x1b[2J" in text and "\\u202e1.0" in text and "\\x1b]0;pwned\\x07 boom" in text
    entry = client.TaskEntry(LAYOUT.node_key("x"), keys.Target.node("x"), 3, b"\x1b[31m\xff")
    listing = client_render.tasks_text([entry])
    assert "\\x1b[31m\ufffd" in listing and all(line.isprintable() for line in listing.split("\n"))
    assert client_render.printable("plain text") == "plain text"
