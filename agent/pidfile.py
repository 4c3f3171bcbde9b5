"""The `-pid` file: refuse to start beside a live agent, replace a stale file, and remove
it at exit (only if it still names this process)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class PidFileError(RuntimeError):
    """The pid file cannot be taken; the text says why."""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidFileError(f"-pid: cannot read {str(path)!r}: {exc.strerror}") from None
    try:
        pid = int(text.split()[0]) if text else 0
    except ValueError:
        return None
    return pid if pid > 0 else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def acquire(path: Path, *, pid: int | None = None) -> None:
    """Write our pid to `path`; raises PidFileError if it names another live process."""
    own = os.getpid() if pid is None else pid
    other = read_pid(path)
    if other is not None and other != own and process_alive(other):
        raise PidFileError(
            f"-pid: {str(path)!r} names process {other}, which is running: is another "
            "gleam-agent using this pid file? Stop it, or remove the file if it is not an agent"
        )
    tmp = path.with_name(f".{path.name}.{own}.tmp")
    try:
        _write_new(tmp, f"{own}\n".encode("ascii"))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PidFileError(f"-pid: cannot write {str(path)!r}: {exc.strerror}") from None


# The temporary's name is predictable, and the pid file's folder may be one others can
# write to. O_EXCL never opens a file that is already there, O_NOFOLLOW never follows a
# symlink planted at the name (which would make the agent write wherever it points).
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_new(tmp: Path, data: bytes) -> None:
    try:
        fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    except FileExistsError:
        # Left by an agent that died with our pid, or planted. unlink removes the name
        # itself, never what a symlink points to; then one more try, which fails if
        # something is planted again.
        tmp.unlink()
        fd = os.open(tmp, _CREATE_FLAGS, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def release(path: Path, *, pid: int | None = None) -> None:
    """Remove `path` if it still names this process."""
    own = os.getpid() if pid is None else pid
    with contextlib.suppress(PidFileError):
        if read_pid(path) == own:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
