"""Parsed manifests by git blob id and directory, kept in the checkout's git directory.

A manifest's message bytes depend only on the file's contents, the kind of target its
directory makes it (manifests.cache_key) and the parsing rules, and a blob id names the
contents exactly, so a blob parsed once in a directory never needs parsing there again.
YAML parsing is most of a full pass (about 50 us a manifest with the C loader), so with
this cache a `--full` re-check or a daemon's full pass over 10,000 unchanged manifests
reads no YAML at all. The file carries a fingerprint of the parsing code and the schema,
so a change to either empties it; any unreadable file is simply ignored. It holds only
the blobs of the last full read, so it never grows past one tree's worth.
"""

from __future__ import annotations

import logging
import marshal
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from reconciler import launch, manifests

log = logging.getLogger("gleam.reconcile")

FILE_NAME = launch.CACHE_FILE


def path_for(git_dir: Path) -> Path:
    return git_dir / FILE_NAME


def load(path: Path) -> dict[str, bytes]:
    """The cached {manifests.cache_key: message bytes}; empty when missing, stale or
    unreadable.
    Waits for a save_soon of the same file that is still writing."""
    _wait(path)
    try:
        # O_NONBLOCK and a regular file only: a FIFO put in its place would hang the pass.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return {}
            body = marshal.load(fh)
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if not isinstance(body, tuple) or len(body) != 2 or body[0] != manifests.rules_fingerprint():
        return {}
    entries = body[1]
    return entries if isinstance(entries, dict) else {}


def save(path: Path, entries: Mapping[str, bytes]) -> None:
    """Replace the cache atomically; a failure only costs speed, so it is logged."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gleam-cache-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                marshal.dump((manifests.rules_fingerprint(), dict(entries)), fh)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.debug("could not write the manifest cache %s: %s", path, exc)


# Saves still being written, by file: a pass writes the cache on a thread while it goes
# on to etcd (10,000 manifests: some 15 ms of marshal and disk), and the next load or
# save of the same file waits for it. Not daemon threads: the process waits for them
# at exit (reconciler.launch.leave too), so a cache is never left half written.
_saving: dict[Path, threading.Thread] = {}
_saving_guard = threading.Lock()


def save_soon(path: Path, entries: Callable[[], Mapping[str, bytes]]) -> None:
    """save(path, entries()) on a thread of its own."""
    _wait(path)
    thread = threading.Thread(target=lambda: save(path, entries()), name="gleam-parse-cache-save")
    with _saving_guard:
        _saving[path] = thread
    thread.start()


def _wait(path: Path) -> None:
    with _saving_guard:
        thread = _saving.pop(path, None)
    if thread is not None:
        thread.join()
