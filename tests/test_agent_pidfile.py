"""agent.pidfile and agent.backoff: small pieces with rules of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import pidfile
from agent.backoff import Backoff


def test_a_pid_file_naming_a_live_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(f"{other.pid}\n")
        with pytest.raises(pidfile.PidFileError, match=str(other.pid)):
            pidfile.acquire(path)
        assert path.read_text() == f"{other.pid}\n"
    finally:
        other.kill()
        other.wait()


def test_a_stale_or_garbled_pid_file_is_replaced_and_released(tmp_path: Path) -> None:
    path = tmp_path / "agent.pid"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for content in (f"{dead.pid}\n", "garbage", ""):
        path.write_text(content)
        pidfile.acquire(path)
        assert path.read_text() == f"{os.getpid()}\n"
        pidfile.release(path)
        assert not path.exists()


def test_release_leaves_a_file_that_names_another_process(tmp_path: Path) -> None:
    path = tmp_path / "agent.pid"
    path.write_text("1\n")
    pidfile.release(path)
    assert path.exists()


def test_an_unwritable_pid_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(pidfile.PidFileError, match="-pid"):
        pidfile.acquire(tmp_path / "missing-dir" / "agent.pid")


@pytest.mark.parametrize("planted", ["symlink to a file", "dangling symlink", "stale file"])
def test_something_at_the_temporarys_name_never_makes_the_agent_write_elsewhere(
    tmp_path: Path, planted: str
) -> None:
    # The temporary's name is predictable: .<name>.<pid>.tmp beside the pid file.
    path, victim = tmp_path / "agent.pid", tmp_path / "elsewhere" / "crontab"
    victim.parent.mkdir()
    tmp = tmp_path / ".agent.pid.4242.tmp"
    if planted == "stale file":
        tmp.write_text("left over\n")
    else:
        if planted == "symlink to a file":
            victim.write_text("precious\n")
        tmp.symlink_to(victim)
    pidfile.acquire(path, pid=4242)
    assert path.read_text() == "4242\n" and not path.is_symlink()
    assert not tmp.exists() and not tmp.is_symlink()
    if planted == "symlink to a file":
        assert victim.read_text() == "precious\n"
    else:
        assert not victim.exists()


def test_a_pid_file_that_is_a_symlink_is_replaced_not_written_through(tmp_path: Path) -> None:
    path, victim = tmp_path / "agent.pid", tmp_path / "victim"
    victim.write_text("precious\n")
    path.symlink_to(victim)
    pidfile.acquire(path, pid=4242)
    assert victim.read_text() == "precious\n"
    assert path.read_text() == "4242\n" and not path.is_symlink()


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    low = Backoff(initial=0.1, cap=2.0, rng=lambda: 0.0)
    high = Backoff(initial=0.1, cap=2.0, rng=lambda: 1.0)
    lows = [low.next_delay() for _ in range(8)]
    highs = [high.next_delay() for _ in range(8)]
    assert lows[0] == pytest.approx(0.05) and highs[0] == pytest.approx(0.1)
    assert highs == sorted(highs) and highs[-1] == pytest.approx(2.0)
    assert all(lo == pytest.approx(hi / 2) for lo, hi in zip(lows, highs, strict=True))
    high.reset()
    assert high.next_delay() == pytest.approx(0.1)
