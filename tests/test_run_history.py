"""tests.run_history, the fault tests' history check: reading runs from agent logs and
comparing them with result records (pure)."""

from __future__ import annotations

from tests import run_history

FIRST = """\
2026-11-30 05:00:01 INFO agent.worker: running echo from /g/node/a at revision 5
2026-11-30 05:00:02 INFO agent.worker: running echo from /g/region/r at revision 6
2026-11-30 05:00:03 ERROR agent.worker: /g/node/a at revision 8: bad task message: not JSON
"""
SECOND = "2026-11-30 05:01:00 INFO agent.worker: running gate from /g/node/a at revision 9\n"


def test_runs_are_read_in_order_including_bad_messages() -> None:
    assert run_history.runs(FIRST) == [("/g/node/a", 5), ("/g/region/r", 6), ("/g/node/a", 8)]


def test_the_last_run_per_key_spans_the_processes_in_order() -> None:
    assert run_history.last_runs([FIRST, SECOND]) == {"/g/node/a": 9, "/g/region/r": 6}


def test_a_record_older_than_the_last_run_or_missing_is_a_mismatch() -> None:
    last = {"/g/node/a": 9, "/g/region/r": 6}
    assert run_history.mismatches(last, {"/g/node/a": 9, "/g/region/r": 6}) == []
    assert run_history.mismatches(last, {"/g/node/a": 5}) == [
        run_history.Mismatch("/g/node/a", 9, 5),
        run_history.Mismatch("/g/region/r", 6, None),
    ]


def test_a_run_repeated_in_one_process_is_a_duplicate() -> None:
    assert run_history.duplicates(FIRST) == []
    assert run_history.duplicates(FIRST + FIRST.splitlines()[0]) == [("/g/node/a", 5)]
