"""The reconciler's meta records (reconciler/records.py) and its rendering of plans and
results (reconciler/render.py), tested directly: pure values in, values or text out."""

from __future__ import annotations

import json

import pytest

from gleam import client, keys, messages
from reconciler import desired, diff, manifests, reconcile, records, render

C1, C2 = "1" * 40, "2" * 40


def apply(commit: str | None, *, source: str = "commit", keys_: int = 3) -> records.Apply:
    return records.Apply(
        source=source, commit=commit, time="2026-01-01T00:00:00+00:00", keys=keys_, digest="d"
    )


# state: the applied record -------------------------------------------------------------


def test_a_record_survives_encode_and_decode() -> None:
    record = records.after(None, apply(C1))
    assert records.decode(record.encode()) == record
    assert record.commit == C1 and record.last == apply(C1)


def test_history_is_newest_first_and_capped() -> None:
    record = None
    for n in range(records.HISTORY + 3):
        record = records.after(record, apply(C1, keys_=n))
    assert record is not None and len(record.history) == records.HISTORY
    assert [a.keys for a in record.history[:2]] == [records.HISTORY + 2, records.HISTORY + 1]


def test_a_worktree_apply_keeps_the_guards_commit() -> None:
    record = records.after(records.after(None, apply(C1)), apply(C2, source="worktree"))
    assert record.commit == C1  # the guard's reference: the last commit applied from git
    assert record.last is not None and not record.last.from_git
    assert records.after(None, apply(None, source="worktree")).commit is None


def test_an_old_record_without_the_newer_fields_reads_with_defaults() -> None:
    raw = json.dumps(
        {
            "version": records.RECORD_VERSION,
            "commit": C1,
            "history": [{"source": "commit", "commit": C1, "time": "t", "keys": 1, "digest": "d"}],
        }
    ).encode()
    last = records.decode(raw).last
    assert last is not None and (last.mode, last.pruned, last.rules) == ("full", False, "")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not a valid record"),
        (b"[]", "not a valid record"),
        (b'{"version": 99}', "record version 99"),
        (b'{"version": 1, "history": [{"source": "commit"}]}', "not a valid record"),
        (b'{"version": 1, "history": [], "commit": 7}', "not a valid record"),
        (b'{"version": 1, "history": [{"keys": "x"}]}', "not a valid record"),
    ],
)
def test_an_unreadable_record_is_a_state_error_naming_meta_applied(
    raw: bytes, message: str
) -> None:
    with pytest.raises(records.RecordError, match=message) as caught:
        records.decode(raw)
    assert "meta/applied" in str(caught.value)


def test_an_ownership_record_names_the_commit_only_for_a_git_apply() -> None:
    assert json.loads(records.origin_record(source="commit", commit=C1)) == {
        "commit": C1,
        "source": "commit",
    }
    assert json.loads(records.origin_record(source="worktree", commit=C1)) == {"source": "worktree"}


# render: plans and results as text and JSON -------------------------------------------

LAYOUT = keys.Layout("/g")
PRINT = messages.Task("print", {"x": 1}).encode()
PRINT2 = messages.Task("print", {"x": 2}).encode()


def result(*changes: diff.Change, dry_run: bool = False, **plan: object) -> reconcile.Pass:
    wanted = desired.Desired({}, None, "commit", C1, "git-tree:t", 4, "full")
    first = diff.Plan(tuple(changes), **plan)  # type: ignore[arg-type]
    return reconcile.Pass(
        desired=wanted,
        previous=None,
        plan=first,
        applied=() if dry_run else tuple(changes),
        dry_run=dry_run,
    )


def test_each_action_has_its_symbol_and_an_update_shows_its_fields() -> None:
    key = LAYOUT.node_key("a")
    lines = {
        action: render.change_lines(diff.Change(action, key, new=PRINT2, old=PRINT))
        for action in diff.Action
    }
    assert lines[diff.Action.CREATE] == [f"+ {key}  print"]
    assert lines[diff.Action.DELETE] == [f"- {key}  print"]
    assert lines[diff.Action.ADOPT] == [f"= {key}  print  (already as wanted; now owned)"]
    assert lines[diff.Action.FORGET][0].startswith(f"- {key}  (already gone")
    update = lines[diff.Action.UPDATE]
    assert update[0] == f"~ {key}  print  (written by hand before; now owned)"
    assert update[1:] == ["    data.x: 1 -> 2"]


def test_a_written_value_is_named_from_its_manifest_signed_or_not() -> None:
    """The output names a change from the parse (no second decode) when the value is the
    manifest's bytes, or those bytes signed; any other value is decoded."""
    key = LAYOUT.node_key("a")
    value = b'{"Data":1,"Name":"print"}'
    known = {
        key: manifests.Manifest(
            "tasks/nodes/a.yaml", LAYOUT.parse_task_key(key), value, name="from-parse"
        )
    }  # type: ignore[arg-type]
    signed = value[:-1] + b',"Sig":{"alg":"ed25519"}}'
    other = value[:-1] + b',"Name":"etcd"}'
    for raw, name in ((value, "from-parse"), (signed, "from-parse"), (other, "etcd")):
        change = diff.Change(diff.Action.CREATE, key, new=raw)
        assert render.change_lines(change, known) == [f"+ {key}  {name}"]


def test_a_value_that_is_no_task_is_named_so() -> None:
    change = diff.Change(diff.Action.DELETE, LAYOUT.node_key("a"), old=b"\xff")
    assert render.change_lines(change) == [f"- {LAYOUT.node_key('a')}  (not a task message)"]


def test_the_summary_says_planned_or_applied_and_counts_each_action() -> None:
    create = diff.Change(diff.Action.CREATE, LAYOUT.node_key("a"), new=PRINT)
    forget = diff.Change(diff.Action.FORGET, LAYOUT.node_key("b"))
    dry = render.summary(result(create, forget, dry_run=True, unchanged=2))
    assert dry == (
        f"Plan for commit {C1[:12]}: 1 to create, 0 to update, 1 to delete, 2 unchanged "
        "(full pass, 4 manifest(s)). Dry run: nothing written."
    )
    done = render.summary(result(create, unchanged=2))
    assert done.startswith(f"Applied commit {C1[:12]}: 1 created, 0 updated, 0 deleted")
    assert render.summary(result()) == (
        f"No changes: etcd matches commit {C1[:12]} (full pass, 4 manifest(s))."
    )


def test_kept_orphans_are_listed_up_to_a_few() -> None:
    orphans = tuple(LAYOUT.node_key(f"o{n}") for n in range(render.SHOWN_ORPHANS + 2))
    last = render.text(result(orphans=orphans)).splitlines()[-1]
    assert last.startswith(f"{len(orphans)} owned key(s) have no manifest any more")
    assert orphans[render.SHOWN_ORPHANS - 1] in last and orphans[-1] not in last
    assert last.endswith(", ...")


def test_the_json_document_carries_every_field_and_revisions() -> None:
    create = diff.Change(diff.Action.CREATE, LAYOUT.node_key("a"), new=PRINT)
    done = result(create)
    done = reconcile.Pass(**{**done.__dict__, "revisions": {create.key: 42}})
    doc = json.loads(render.dumps(render.as_json(done)))
    assert doc["version"] == render.JSON_VERSION and doc["ok"] is True
    assert doc["changes"] == [
        {"action": "create", "key": create.key, "name": "print", "revision": 42}
    ]
    assert doc["summary"]["create"] == 1 and doc["wait"] is None
    assert (doc["commit"], doc["mode"], doc["manifests"]) == (C1, "full", 4)


def test_manifest_errors_and_failures_as_json() -> None:
    error = manifests.ManifestError("tasks/nodes/a.yaml", 3, "bad")
    assert render.errors_json([error])["errors"] == [
        {"file": "tasks/nodes/a.yaml", "line": 3, "message": "bad"}
    ]
    assert render.failure_json("boom") == {"version": 1, "ok": False, "error": "boom"}


def test_wait_reports_read_one_line_each_and_a_total() -> None:
    def report(outcome: client.Outcome) -> client.Report:
        return client.Report("web-1", LAYOUT.node_key("a"), 7, outcome)

    garbled = client.Report(
        "web-1", LAYOUT.node_key("a"), 7, client.Outcome.INVALID, invalid="/k: not JSON"
    )
    lines = render.report_lines(
        [report(client.Outcome.OK), report(client.Outcome.PENDING), garbled], timeout=5
    )
    assert lines == [
        f"ok      web-1  {LAYOUT.node_key('a')} @7",
        f"no answer in 5s  web-1  {LAYOUT.node_key('a')} @7",
        f"invalid web-1  {LAYOUT.node_key('a')} @7: (invalid) /k: not JSON",
        "--wait: 1 of 3 agent result(s) ok.",
    ]
    assert render.report_json(garbled)["invalid"] == "/k: not JSON"
    assert render.report_lines([], timeout=5, written=0)[0].startswith("--wait: nothing")
    assert (
        render.report_lines([], timeout=5)[0] == "--wait: no live agent watches the changed keys."
    )


def test_a_worktree_pass_names_the_work_tree() -> None:
    wanted = desired.Desired({}, None, "worktree", C1, "sha256:x", 0, "full")
    done = reconcile.Pass(desired=wanted, previous=None, plan=diff.Plan())
    assert f"the work tree (on {C1[:12]})" in render.summary(done)
