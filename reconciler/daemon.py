"""gleam-reconcile without --once: a thin loop around reconcile.run.

A pass runs at start, when the checkout changes (watchdog on .git's refs, and on tasks/
with --worktree; debounced), and every --interval seconds. The loop keeps the last full
desired state in memory, so an interval pass with HEAD unchanged reads no git at all:
it compares every key in etcd with that state and puts back what someone changed by
hand (drift), logging it. HEAD moving gives an incremental pass, merged into the cached
state; every --full-every'th pass reads every manifest again (cheap with the parse
cache). --pull fetches and fast-forwards before each interval pass.

Each pass holds the apply lock (`<prefix>/meta/lock`), so two daemons on one prefix, or a
daemon and a CI job, never apply at the same time. SIGTERM/SIGINT stop the loop cleanly,
also while it waits for the lock.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from gleam import connection, keys, logformat, rollout_driver
from reconciler import desired, diff, gitsource, manifests, reconcile, render, sync

log = logging.getLogger("gleam.reconcile")

WRITE_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})
RETRY_SECONDS = 10.0


class Reason(StrEnum):
    START = "start"
    CHANGE = "checkout changed"
    INTERVAL = "interval"


@dataclass(frozen=True)
class LoopSettings:
    interval: float = 300.0
    full_every: int = 12
    debounce: float = 0.1
    pull: bool = False
    retry: float = RETRY_SECONDS  # after a failed pass, try again this soon
    metrics: tuple[str, int] | None = None  # -metrics HOST:PORT (reconciler/observe.py)


@dataclass(frozen=True)
class PassReport:
    """What one pass did, for logs and tests."""

    number: int
    reason: Reason
    result: reconcile.Pass | None
    error: str | None = None
    cause: BaseException | None = None  # what ended a failed pass (for metrics and health)
    seconds: float = 0.0  # how long the pass took


class CheckoutWatch:
    """Sets `changed` when HEAD or a branch moves (.git's HEAD, refs, packed-refs), or,
    with `worktree`, when a file under tasks/ changes. Runs on watchdog's thread."""

    def __init__(self, repo: Path, git_dir: Path | None, *, worktree: bool) -> None:
        self.changed = threading.Event()
        self._repo = repo
        self._git_dir = git_dir
        self._worktree = worktree
        self._observer: Any = None

    def relevant(self, path: str) -> bool:
        if self._git_dir is not None and path.startswith(str(self._git_dir) + "/"):
            rel = path[len(str(self._git_dir)) + 1 :]
            # logs/HEAD also moves with every commit in a linked worktree, whose branch
            # refs live in the common git dir.
            return rel in ("HEAD", "packed-refs", "logs/HEAD") or rel.startswith("refs/")
        tasks = str(self._repo / manifests.TASKS_DIR) + "/"
        return self._worktree and path.startswith(tasks)

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watch = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Reads (git's own, GitPython's) show up as opened/closed_no_write.
                if event.event_type not in WRITE_EVENTS:
                    return
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    # fsdecode: a file name that is not UTF-8 must not kill this thread.
                    path = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw or "")
                    if path and watch.relevant(path):
                        watch.changed.set()
                        return

        observer = Observer()
        handler = Handler()
        if self._git_dir is not None:
            observer.schedule(handler, str(self._git_dir), recursive=True)
        tasks = self._repo / manifests.TASKS_DIR
        if self._worktree and tasks.is_dir():
            observer.schedule(handler, str(tasks), recursive=True)
        elif self._worktree:
            observer.schedule(handler, str(self._repo), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


class Daemon:
    def __init__(
        self,
        store: sync.Store,
        options: reconcile.Options,
        settings: LoopSettings,
        *,
        stop: threading.Event | None = None,
        on_pass: Callable[[PassReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.layout = store.layout
        self.options = options
        self.settings = settings
        self.stop = stop or threading.Event()
        self.on_pass = on_pass
        self._clock = clock
        self._desired: desired.Desired | None = None  # last full desired state
        self._passes = 0
        self.source: gitsource.Source | None = None
        # For the watchdog (reconciler/observe.py): when the loop last went round, and
        # when the pass in progress began (None: between passes).
        self.alive_at = clock()
        self.busy_since: float | None = None

    # The loop ---------------------------------------------------------------------------
    def run(self, *, max_passes: int | None = None) -> None:
        try:
            self.source = gitsource.Source(self.options.repo)
        except gitsource.GitError:
            if not self.options.worktree:
                raise
        git_dir = self.source.git_dir if self.source is not None else None
        watch = CheckoutWatch(self.options.repo, git_dir, worktree=self.options.worktree)
        watch.start()
        log.info(
            "reconciling %s into %s every %gs (full every %d passes%s)",
            self.options.repo,
            self.layout.prefix,
            self.settings.interval,
            self.settings.full_every,
            ", pulling" if self.settings.pull else "",
        )
        try:
            reason = Reason.START
            while not self.stop.is_set():
                ok = self.one_pass(reason)
                if max_passes is not None and self._passes >= max_passes:
                    return
                wait = (
                    self.settings.interval
                    if ok
                    else min(self.settings.interval, self.settings.retry)
                )
                reason = self._wait(watch, wait)
        finally:
            watch.stop()
            log.info("stopped")

    def _wait(self, watch: CheckoutWatch, seconds: float) -> Reason:
        """Sleep until the interval ends, the checkout changes (then quiet for `debounce`
        seconds, so a burst of ref updates gives one pass) or stop is asked."""
        deadline = self._clock() + seconds
        while not self.stop.is_set():
            self.alive_at = self._clock()
            remaining = deadline - self._clock()
            if remaining <= 0:
                return Reason.INTERVAL
            if watch.changed.wait(min(remaining, 0.5)):
                while not self.stop.is_set():
                    self.alive_at = self._clock()
                    watch.changed.clear()
                    if not watch.changed.wait(self.settings.debounce):
                        break
                return Reason.CHANGE
        return Reason.INTERVAL

    # One pass ---------------------------------------------------------------------------
    def one_pass(self, reason: Reason) -> bool:
        """Run one pass; errors are logged, never raised. True if it succeeded."""
        self._passes += 1
        number = self._passes
        self.busy_since = self._clock()
        # A full read at start (and whenever the cached state was dropped) gives the
        # state that later interval passes compare with etcd.
        full = number % self.settings.full_every == 0 or self._desired is None
        if reason is Reason.INTERVAL and self.settings.pull and self.source is not None:
            try:
                before, after = self.source.pull()
                if before != after:
                    log.info("pulled %s -> %s", before[:12], after[:12])
            except gitsource.GitError as exc:
                log.error("%s", exc)
        try:
            result = self._reconcile(full=full)
        except manifests.InvalidManifests as exc:
            for error in exc.errors:
                log.error("%s", error)
            return self._report(
                number, reason, None, f"{len(exc.errors)} invalid manifest(s)", cause=exc
            )
        except sync.LockTimeout as exc:
            if self.stop.is_set():
                return self._report(number, reason, None, "stopped while waiting for the lock")
            log.warning("%s", exc)
            return self._report(number, reason, None, str(exc), cause=exc)
        except sync.EtcdFailed as exc:
            log.error("etcd: %s", exc)
            return self._report(number, reason, None, str(exc), cause=exc)
        except reconcile.PASS_ERRORS as exc:
            log.error("%s", exc)
            return self._report(number, reason, None, str(exc), cause=exc)
        except (MemoryError, RecursionError) as exc:
            message = reconcile.resource_failure(exc)
            log.error("%s", message)
            return self._report(number, reason, None, message, cause=exc)
        except Exception as exc:  # noqa: BLE001 - a bug in one pass must not end the daemon
            log.exception("pass %d failed unexpectedly", number)
            return self._report(number, reason, None, f"{type(exc).__name__}: {exc}", cause=exc)
        self._log_result(result, reason)
        return self._report(number, reason, result, None)

    def _reconcile(self, *, full: bool) -> reconcile.Pass:
        options = replace(self.options, full=self.options.full or full, dry_run=False)
        cached = self._desired
        head = None
        if self.source is not None and not options.worktree:
            head = self.source.head()
        use_cache = (
            cached is not None
            and not options.full
            and head is not None
            and cached.commit == head
            and cached.source == "commit"
        )
        if use_cache:
            # HEAD has not moved: compare every key with the state read before (drift).
            return reconcile.run(
                self.store,
                options,
                source=self.source,
                desired=cached,
                cancel=self.stop,
            )
        result = reconcile.run(self.store, options, source=self.source, cancel=self.stop)
        self._remember(result)
        return result

    def _remember(self, result: reconcile.Pass) -> None:
        """Keep the full desired state for the next pass (see Desired.merge)."""
        newer = result.desired
        if self._desired is None and newer.scope is not None:
            return  # nothing to merge an incremental read into: the next pass reads all
        base = result.previous.commit if result.previous else None
        self._desired = (self._desired or newer).merge(newer, base_commit=base)

    def _log_result(self, result: reconcile.Pass, reason: Reason) -> None:
        with logformat.context(commit=result.desired.commit):  # a field of JSON log lines
            self._log_changes(result, reason)

    def _log_changes(self, result: reconcile.Pass, reason: Reason) -> None:
        drift = result.previous is not None and result.previous.commit == result.desired.commit
        for change in result.applied:
            for line in render.change_lines(change, result.desired.entries):
                log.info(
                    "%s%s",
                    "drift, put back: " if drift and change.action in diff.WRITES else "",
                    line,
                )
        if result.applied or reason is not Reason.INTERVAL:
            log.info("%s [%s]", render.summary(result), reason.value)

    def _report(
        self,
        number: int,
        reason: Reason,
        result: reconcile.Pass | None,
        error: str | None,
        *,
        cause: BaseException | None = None,
    ) -> bool:
        started, self.busy_since = self.busy_since, None
        seconds = self._clock() - started if started is not None else 0.0
        if self.on_pass is not None:
            self.on_pass(PassReport(number, reason, result, error, cause, seconds))
        return error is None


def main(
    etcd_settings: connection.Settings,
    layout: keys.Layout,
    options: reconcile.Options,
    settings: LoopSettings,
) -> int:
    """The daemon's entry point from cli.main: connect, trap signals, loop."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        etcd = connection.connect_reachable(etcd_settings)
    except connection.ETCD_ERRORS as exc:
        log.error(
            "cannot connect to etcd at %s: %s",
            etcd_settings.describe(),
            connection.describe_error(exc),
        )
        return 1
    from reconciler import observe  # systemd readiness and watchdog, /healthz, -metrics

    # Rollouts (gleam.rollout): started and moved on by their own thread, all of them;
    # each pass wakes it, so a staged task's gate follows the pass that wrote it.
    driver = rollout_driver.DriverThread(rollout_driver.Driver.over(etcd, layout), stop=stop)
    daemon = Daemon(
        sync.Store.over(etcd, layout), options, settings, stop=stop,
        on_pass=lambda _: driver.kick(),
    )  # fmt: skip
    driver.start()
    observer = observe.Observer(daemon, etcd=etcd)
    try:
        observer.start(settings.metrics)
    except observe.ListenError as exc:
        log.error("%s", exc)
        etcd.close()
        return 1
    try:
        daemon.run()
    except gitsource.GitError as exc:
        log.error("%s", exc)
        return 1
    finally:
        observer.stop()  # STOPPING=1
        stop.set()
        driver.join(5.0)
        etcd.close()
    return 0
