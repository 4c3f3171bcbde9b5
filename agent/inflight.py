"""The task in hand, recorded before it runs, so that a task that kills or wedges the agent
cannot make it crash at every start (a crash loop).

Before the worker runs a task it records the task's key and revision, and how many times
this agent has started that revision; when the run ends (whatever its outcome) the record
goes. A record still there at the next start is a task the agent was running when it
stopped without finishing it (a crash, SIGKILL, a power cut, a second SIGTERM). Such a
task is run once more; if it is interrupted again it is not run a third time but
recorded as failed: `interrupted twice: the agent stopped while running it`.

The records live in memory and in a small state file, `<state dir>/<agent id>.state`
(README: -state_dir). The file is created once (O_NOFOLLOW, mode 0600, in a directory
this user owns that no one else can write) and then rewritten in place with one write()
of a few hundred bytes per change: no rename, no fsync. A process crash cannot lose such
a write; a power cut may lose the last one, which makes a task run once more than it
would have. Keeping it this cheap matters: two records per task, at thousands of tasks
a second (a rename costs about 0.4 ms on the benchmark machine, a write() 1 µs).

`begin`, `encode` and `decode` are pure; `StartedTasks` holds the file.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.inflight")

# A revision is started at most this many times; one more start is refused.
MAX_RUNS = 2
INTERRUPTED_TWICE = "interrupted twice: the agent stopped while running it"
# Records of tasks that never came back (their key was deleted or changed): the oldest
# beyond this many are forgotten, so the file stays small.
MAX_RECORDS = 32
# A state file larger than this is not ours to read.
MAX_FILE_BYTES = 1024 * 1024
_VERSION = 1


@dataclass(frozen=True)
class Started:
    """This agent started `key` at `revision`, `runs` times, and has not finished it."""

    key: str
    revision: int
    runs: int


class RecordError(Exception):
    """The state file or its directory cannot be used; the text names it."""


def begin(records: Mapping[str, Started], key: str, revision: int) -> Started:
    """The record for starting `key` at `revision` now: one more run of a revision that
    was interrupted before, or a first run (an older revision's record is replaced)."""
    previous = records.get(key)
    if previous is not None and previous.revision == revision:
        return Started(key, revision, previous.runs + 1)
    return Started(key, revision, 1)


def encode(records: Iterable[Started]) -> bytes:
    items = [[r.key, r.revision, r.runs] for r in records]
    return json.dumps({"version": _VERSION, "started": items}, separators=(",", ":")).encode()


def decode(raw: bytes) -> dict[str, Started]:
    """Records from a state file's bytes (trailing spaces allowed); RecordError if they
    are not a state file's."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"not a state file ({exc})") from None
    if not isinstance(value, dict) or value.get("version") != _VERSION:
        raise RecordError("not a state file of this version")
    records: dict[str, Started] = {}
    for item in value.get("started") or ():
        match item:
            case [str(key), int(revision), int(runs)] if runs > 0:
                records[key] = Started(key, revision, runs)
            case _:
                raise RecordError(f"a record that is not (key, revision, runs): {item!r:.100}")
    return records


class StartedTasks:
    """The records, in memory and (with a path) in the state file. Never raises once
    open: a file that cannot be written is logged, and the records live on in memory."""

    def __init__(self, path: Path | None = None) -> None:
        self._records: dict[str, Started] = {}
        self._fd: int | None = None
        self._size = 0
        self.path = path
        if path is not None:
            self._open(path)

    @property
    def records(self) -> dict[str, Started]:
        return dict(self._records)

    def begin(self, key: str, revision: int) -> int:
        """Record that `key` at `revision` starts now; how many times it has been started,
        this time included (more than MAX_RUNS: do not run it)."""
        started = begin(self._records, key, revision)
        self._records.pop(key, None)
        self._records[key] = started
        while len(self._records) > MAX_RECORDS:
            del self._records[next(iter(self._records))]
        self._save()
        return started.runs

    def end(self, key: str) -> None:
        """The run of `key` ended (whatever its outcome)."""
        if self._records.pop(key, None) is not None:
            self._save()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # The file ------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        check_directory(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RecordError(f"cannot open {str(path)!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise RecordError(f"{str(path)!r} is not a regular file owned by this user")
            if info.st_size > MAX_FILE_BYTES:
                raise RecordError(f"{str(path)!r} is larger than {MAX_FILE_BYTES} bytes")
            raw = os.pread(fd, MAX_FILE_BYTES, 0)
        except (OSError, RecordError) as exc:
            os.close(fd)
            if isinstance(exc, RecordError):
                raise
            raise RecordError(f"cannot read {str(path)!r}: {exc.strerror}") from None
        self._fd, self._size = fd, len(raw)
        if raw.strip():
            try:
                self._records = decode(raw)
            except RecordError as exc:
                log.warning("state file %s: %s; starting with no record", path, exc)
        for started in self._records.values():
            log.warning(
                "%s at revision %d was running when the agent stopped (started %d time%s)",
                started.key,
                started.revision,
                started.runs,
                "" if started.runs == 1 else "s",
            )

    def _save(self) -> None:
        if self._fd is None:
            return
        body = encode(self._records.values()) + b"\n"
        # Padded over what an older, longer record left: JSON ignores trailing spaces.
        padded = body.ljust(self._size)
        try:
            os.pwrite(self._fd, padded, 0)
        except OSError as exc:
            log.error(
                "cannot write the state file %s: %s; crash-loop protection holds in "
                "memory only until it can",
                self.path,
                exc.strerror,
            )
            return
        self._size = len(padded)


def check_directory(directory: Path) -> None:
    """Create `directory` (mode 0700) if missing; RecordError unless it is a directory of
    this user's that no one else can write (so no one can plant a file or link there)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        raise RecordError(f"cannot create {str(directory)!r}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RecordError(f"{str(directory)!r} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RecordError(
            f"{str(directory)!r} must belong to this user and be writable by no one else "
            f"(it is mode {stat.S_IMODE(info.st_mode):04o})"
        )


def default_directory(environ: Mapping[str, str], *, euid: int) -> Path:
    """Where state files go without -state_dir: systemd's StateDirectory= if the unit
    sets one, /var/lib/gleam for root, else the XDG state directory of the user."""
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if given:
        return Path(given)
    if euid == 0:
        return Path("/var/lib/gleam")
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "gleam"
