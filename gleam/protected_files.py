"""Files whose owner and mode decide who may act as Gleam: the etcd password file, the
signing key, the agent's trusted keys. Each is opened once and checked on the open
file (so the file read is the file checked: no swap between a check and a read), must
be a regular file (a FIFO or /dev/zero would hang or fill memory), and is read up to a
limit.

Two rules, after ssh's:
- PRIVATE (a password, a private key): owned by the user reading it, mode 0600 or
  stricter, as ssh requires of a private key;
- TRUSTED (the public keys an agent trusts): owned by that user or root and writable by
  nobody else, as sshd's StrictModes requires of authorized_keys: whoever may change
  the file may make the agent run their tasks.
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path


class Refused(ValueError):
    """The file cannot be used; the text names it and says why (the caller adds its flag)."""


class Rule(enum.Enum):
    PRIVATE = "private"
    TRUSTED = "trusted"


def read(path: str | Path, *, rule: Rule, limit: int, what: str, uid: int | None = None) -> bytes:
    """The bytes of `path`, a `what` ("password file", "private key"...), if it keeps
    `rule` and holds at most `limit` bytes; Refused otherwise. `uid`: the reading user
    (this process's effective user by default)."""
    name = str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"cannot open {name!r}: {exc.strerror}") from None
    try:
        check(name, os.fstat(fd), rule=rule, what=what, uid=os.geteuid() if uid is None else uid)
        data = b""
        while chunk := os.read(fd, limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise Refused(f"{name!r} is over {limit} bytes")
    except OSError as exc:
        raise Refused(f"cannot read {name!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return data


def check(path: str, st: os.stat_result, *, rule: Rule, what: str, uid: int) -> None:
    """Refused unless the file whose status is `st` keeps `rule` for user `uid`."""
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{path!r} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if rule is Rule.PRIVATE:
        if st.st_uid != uid:
            raise Refused(
                f"{path!r} is owned by uid {st.st_uid}, not by this user (uid {uid}); "
                f"a {what} must belong to the user that reads it"
            )
        if mode & 0o077:
            raise Refused(
                f"{path!r} has mode {mode:04o}, so other users may read or change it; "
                f"make it 0600 or stricter (chmod 600 {path})"
            )
        return
    if st.st_uid not in (uid, 0):
        raise Refused(
            f"{path!r} is owned by uid {st.st_uid}, not by this user (uid {uid}) or root; "
            f"a {what} decides which tasks run, so nobody else may own it"
        )
    if mode & 0o022:
        raise Refused(
            f"{path!r} has mode {mode:04o}, so other users may change it; "
            f"take their write permission away (chmod go-w {path})"
        )
