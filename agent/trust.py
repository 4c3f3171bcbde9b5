"""`-trust FILE`: the agent runs only tasks signed by a trusted key, for this very task
key, and not older than what it last ran from that key.

`check` is pure: (message bytes, task key, last run revision, trusted keys) -> the
refusal (the failed result's error, starting `signature:`), or None to run;
`check_message` takes the message as the worker already decoded it. `Gate` holds the
trusted keys (re-read on SIGHUP) and the revision last run per task key; it is
consulted by the worker just before a task runs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import pending
from gleam import signing

log = logging.getLogger("agent.trust")

PREFIX = "signature: "


def check(
    raw: bytes,
    *,
    key: str,
    last_run: int | None,
    trusted: Mapping[str, Ed25519PublicKey],
) -> str | None:
    """Why the message `raw` at task key `key` must not run, or None."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return PREFIX + "missing"
    return check_message(message, key=key, last_run=last_run, trusted=trusted)


def check_message(
    message: Any,
    *,
    key: str,
    last_run: int | None,
    trusted: Mapping[str, Ed25519PublicKey],
) -> str | None:
    """`check` of the message as the worker decoded it (the values that would run).

    A writer's P is the key's mod_revision when it wrote, so it is never below a revision
    the key had before: P below the last revision this agent ran (or refused) from the
    key is an older message written again (a replay)."""
    try:
        verified = signing.verify_message(message, key=key, trusted=trusted)
    except signing.SignatureError as exc:
        return PREFIX + str(exc)
    if last_run is not None and verified.prev < last_run:
        return f"{PREFIX}replay of an older task (prev {verified.prev} < last run {last_run})"
    return None


class Gate:
    """The trusted keys and the last revision handled per task key (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._trusted = signing.load_public_keys(path)
        self._last: dict[str, int] = {}

    @property
    def fingerprints(self) -> list[str]:
        with self._lock:
            return sorted(self._trusted)

    def reload(self) -> None:
        """Re-read the file (SIGHUP); a file that has become unreadable or bad keeps the
        keys in use, with an error in the log."""
        try:
            trusted = signing.load_public_keys(self.path)
        except signing.KeyError_ as exc:
            log.error("-trust: %s; keeping the %d key(s) in use", exc, len(self._trusted))
            return
        with self._lock:
            self._trusted = trusted
        log.info("-trust: %d trusted key(s): %s", len(trusted), ", ".join(sorted(trusted)))

    def seed(self, done: Mapping[str, pending.Completed]) -> Mapping[str, pending.Completed]:
        """Take the last revisions from the results read at start (so a replay is refused
        after a restart too); returns `done` unchanged, to sit in the watch's read."""
        with self._lock:
            for key, completed in done.items():
                self._last[key] = max(self._last.get(key, 0), completed.revision)
        return done

    def refusal(self, job: pending.Job, message: Any) -> str | None:
        """Check `job`, whose value decoded to `message`, and, whatever the answer,
        remember its revision as handled."""
        with self._lock:
            trusted = self._trusted
            last = self._last.get(job.key)
            self._last[job.key] = max(last or 0, job.revision)
        return check_message(message, key=job.key, last_run=last, trusted=trusted)
