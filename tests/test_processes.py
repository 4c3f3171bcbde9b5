"""agent.processes: programs run without a shell, bounded in time and output."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from agent.processes import run_program
from tests.support import wait_until


def test_exit_code_and_output_are_captured() -> None:
    done = run_program(["sh", "-c", "printf out; printf err >&2; exit 7"], timeout=10)
    assert (done.exit_code, done.stdout, done.stderr, done.error) == (7, b"out", b"err", None)
    assert not done.ok


def test_large_stdin_is_fed_while_output_is_read() -> None:
    data = os.urandom(300_000)
    done = run_program(["cat"], timeout=20, stdin=data)
    assert done.ok and done.stdout == data


def test_output_is_capped() -> None:
    done = run_program(
        [sys.executable, "-c", "import sys; sys.stdout.write('x' * 100000)"],
        timeout=20,
        max_output=1000,
    )
    assert done.ok and done.stdout == b"x" * 1000 and done.truncated


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    done = run_program(["sh", "-c", script], timeout=0.5)
    assert done.exit_code is None and done.error == "timed out after 0.5 s"
    assert time.monotonic() - started < 15
    child = int(wait_until(lambda: pid_file.read_text().strip(), what="child pid"))

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        # A zombie awaiting its reaper counts as gone.
        status = Path(f"/proc/{child}/stat").read_text().split()[2]
        return status == "Z"

    wait_until(gone, what="background child killed")


def test_program_killed_by_a_signal() -> None:
    done = run_program(["sh", "-c", "kill -TERM $$"], timeout=10)
    assert done.exit_code is None and done.error == "killed by SIGTERM"


def test_missing_program_is_reported() -> None:
    done = run_program(["/no/such/program"], timeout=5)
    assert done.exit_code is None and done.error and "cannot run" in done.error


def test_program_that_leaves_a_background_child_returns_promptly() -> None:
    started = time.monotonic()
    done = run_program(["sh", "-c", "sleep 30 & echo $!"], timeout=20)
    os.kill(int(done.stdout), 9)
    assert done.exit_code == 0
    assert time.monotonic() - started < 15  # not the child's 30 s, nor the timeout


@pytest.mark.parametrize("argv", [[], [""], ["a\0b"]])
def test_unusable_argv_is_a_value_error(argv: list[str]) -> None:
    if argv == [""]:
        assert run_program(argv, timeout=5).exit_code is None
        return
    with pytest.raises(ValueError):
        run_program(argv, timeout=5)
