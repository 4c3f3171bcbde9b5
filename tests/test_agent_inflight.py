"""The record of the task in hand (agent.inflight): the rules, the file, its worst cases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import inflight
from agent.inflight import RecordError, Started, StartedTasks


@pytest.mark.parametrize(
    ("records", "key", "revision", "runs"),
    [
        ({}, "/g/node/a", 5, 1),
        ({"/g/node/a": Started("/g/node/a", 5, 1)}, "/g/node/a", 5, 2),
        ({"/g/node/a": Started("/g/node/a", 5, 2)}, "/g/node/a", 5, 3),
        ({"/g/node/a": Started("/g/node/a", 4, 2)}, "/g/node/a", 5, 1),  # a newer value
        ({"/g/node/b": Started("/g/node/b", 5, 2)}, "/g/node/a", 5, 1),  # another key
    ],
)
def test_begin_counts_runs_of_the_same_revision(
    records: dict[str, Started], key: str, revision: int, runs: int
) -> None:
    assert inflight.begin(records, key, revision) == Started(key, revision, runs)


@given(
    st.lists(
        st.builds(Started, st.text(min_size=1), st.integers(0, 2**63), st.integers(1, 100)),
        unique_by=lambda s: s.key,
    )
)
def test_records_survive_encoding(records: list[Started]) -> None:
    encoded = inflight.encode(records) + b"\n" + b" " * 50
    assert inflight.decode(encoded) == {r.key: r for r in records}


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"[]", b'{"version": 2}', b'{"version": 1, "started": [["k", 1]]}',
     b'{"version": 1, "started": [["k", 1, 0]]}', b"[" * 100_000],
)  # fmt: skip
def test_anything_else_is_not_a_state_file(raw: bytes) -> None:
    with pytest.raises(RecordError):
        inflight.decode(raw)


def test_a_record_outlives_the_process_and_a_finished_task_leaves_none(tmp_path: Path) -> None:
    path = tmp_path / "state" / "web-1.state"
    first = StartedTasks(path)
    assert first.begin("/g/node/web-1", 7) == 1
    first.begin("/g/region/eu-with-a-much-longer-name", 8)  # a longer record
    first.end("/g/region/eu-with-a-much-longer-name")  # shorter again: padded in place
    # The agent dies here: nothing is closed.
    second = StartedTasks(path)
    assert second.records == {"/g/node/web-1": Started("/g/node/web-1", 7, 1)}
    assert second.begin("/g/node/web-1", 7) == 2
    second.end("/g/node/web-1")
    assert StartedTasks(path).records == {}
    assert (path.parent.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)


def test_records_of_tasks_that_never_come_back_are_bounded(tmp_path: Path) -> None:
    started = StartedTasks(tmp_path / "s.state")
    for n in range(inflight.MAX_RECORDS + 10):
        started.begin(f"/g/node/a{n}", n)
    records = StartedTasks(tmp_path / "s.state").records
    assert len(records) == inflight.MAX_RECORDS
    assert f"/g/node/a{inflight.MAX_RECORDS + 9}" in records


def test_a_corrupt_file_is_a_warning_and_an_empty_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.state"
    path.write_bytes(b'{"version": 1, "started": [["/g/node/a", 3')  # a torn write
    path.chmod(0o600)
    tmp_path.chmod(0o700)
    assert StartedTasks(path).records == {}
    assert "starting with no record" in caplog.text


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (state / "web-1.state").symlink_to(victim)
    with pytest.raises(RecordError, match="cannot open"):
        StartedTasks(state / "web-1.state")
    assert victim.read_text() == "precious"


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RecordError, match="writable by no one else"):
        StartedTasks(shared / "web-1.state")


def test_a_file_that_cannot_be_written_keeps_the_records_in_memory(tmp_path: Path) -> None:
    started = StartedTasks(tmp_path / "s.state")
    assert started._fd is not None
    os.close(started._fd)
    started._fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    assert started.begin("/g/node/a", 1) == 1
    assert started.begin("/g/node/a", 1) == 2
    started.close()


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/gleam-agent:/x"}, 0, "/var/lib/gleam-agent"),
        ({}, 0, "/var/lib/gleam"),
        ({"HOME": "/home/op"}, 1000, "/home/op/.local/state/gleam"),
        ({"HOME": "/home/op", "XDG_STATE_HOME": "/srv/state"}, 1000, "/srv/state/gleam"),
    ],
)
def test_default_directory(environ: dict[str, str], euid: int, expected: str) -> None:
    assert inflight.default_directory(environ, euid=euid) == Path(expected)
