"""gleam-reconcile: flags, output and exit codes around one pass (`--once`) or the daemon.

Exit codes: 0 done or nothing to do; 1 error (invalid manifests, refused, etcd trouble,
an agent that failed or did not answer `--wait`); 2 only with `--dry-run
--detailed-exitcode`, when changes are pending (terraform's convention).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from gleam import client, connection, flags, metrics, rollout_driver, signing
from reconciler import manifests, reconcile, render, rollouts, sync

log = logging.getLogger("gleam.reconcile")

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2

RECONCILE_FLAGS: tuple[flags.Flag, ...] = (
    flags.Flag("repo", "the git checkout holding tasks/", ".", metavar="PATH"),
    flags.Flag("output", "text or json", "text", metavar="FORMAT"),
    flags.Flag(
        "wait",
        "after applying, wait up to SECONDS for every live agent watching a changed key; "
        "exit 1 if one failed or did not answer",
        metavar="SECONDS",
    ),
    flags.Flag(
        "interval",
        "daemon: seconds between passes (also puts back drift)",
        "300",
        metavar="SECONDS",
    ),
    flags.Flag("full_every", "daemon: every N-th pass re-reads every manifest", "12", metavar="N"),
    flags.Flag(
        "debounce", "daemon: seconds of quiet after a checkout change", "0.1", metavar="SECONDS"
    ),
    flags.Flag(
        "lock_timeout",
        "seconds to wait for another reconciler's apply lock",
        "60",
        metavar="SECONDS",
    ),
    flags.Flag(
        "max_write_mib",
        "refuse a pass that would write more than this many MiB of task messages to etcd "
        "(etcd's default quota is 2 GiB, history included)",
        str(reconcile.MAX_WRITE_MIB),
        metavar="MIB",
    ),
    signing.FLAG,
    flags.Flag(
        "verify_commits",
        "apply only a HEAD signed by a signer in this git allowed-signers file (SSH keys)",
        metavar="FILE",
    ),
)

SWITCHES: tuple[tuple[str, str], ...] = (
    ("once", "one pass, then exit (for CI); without it gleam-reconcile runs as a daemon"),
    ("worktree", "read tasks/ as it is on disk instead of HEAD's commit (trying things out)"),
    ("prune", "delete owned keys whose manifest is gone"),
    ("allow_empty", "let --prune delete every owned key (an empty tasks tree)"),
    ("force", "apply even if HEAD does not descend from the last applied commit"),
    ("dry_run", "show the plan, write nothing (implies --once)"),
    ("detailed_exitcode", "with --dry-run: exit 2 when changes are pending"),
    ("full", "read and compare every manifest, not only those changed since the last apply"),
    ("pull", "daemon: git fetch and fast-forward before each interval pass"),
    ("no_cache", "parse every manifest again instead of using the parse cache in .git"),
)

ALL_FLAGS = (
    *flags.CONNECTION_FLAGS,
    *flags.LOG_FLAGS,
    *RECONCILE_FLAGS,
    metrics.FLAG,  # daemon: -metrics HOST:PORT (reconciler/observe.py)
)


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on a usage error, which would read as "changes pending".
    def error(self, message: str) -> NoReturn:
        raise flags.UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gleam-reconcile",
        description="Keep etcd's Gleam task keys equal to the YAML manifests in a git checkout.",
        allow_abbrev=False,
    )
    flags.add_flags(parser, ALL_FLAGS)
    for name, help_text in SWITCHES:
        spellings = list(
            dict.fromkeys(
                [
                    f"-{name}",
                    f"--{name}",
                    f"--{name.replace('_', '-')}",
                    f"-{name.replace('_', '-')}",
                ]
            )
        )
        parser.add_argument(*spellings, dest=name, action="store_true", help=help_text)
    return parser


@dataclass(frozen=True)
class Config:
    """Everything the command line decided, validated."""

    options: reconcile.Options
    settings: connection.Settings
    layout: Any
    once: bool
    output: str
    wait: float | None
    detailed_exitcode: bool
    interval: float
    full_every: int
    debounce: float
    pull: bool
    log_values: Mapping[str, str | None]
    metrics: tuple[str, int] | None = None


def _number(values: dict[str, str | None], name: str, *, integer: bool = False) -> float:
    raw = values.get(name)
    try:
        value = int(raw or "") if integer else float(raw or "")
    except ValueError:
        raise flags.FlagError(f"-{name}: {raw!r} is not a number") from None
    # NaN fails every comparison, so a deadline of NaN seconds never comes (a hang), and
    # a wait longer than the platform's timed waits take raises OverflowError: both
    # refused here, by name, rather than found later by the loop that waits.
    if not integer and not math.isfinite(value):
        raise flags.FlagError(f"-{name}: {raw!r} is not a finite number")
    if value < 0 or (integer and value < 1) or (not integer and value > threading.TIMEOUT_MAX):
        raise flags.FlagError(f"-{name}: {raw!r} is out of range")
    return value


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def _switches(args: argparse.Namespace) -> argparse.Namespace:
    """Each switch from the command line, else from GLEAM_<NAME> or the -config file
    (`prune: true`), like the value flags; the same precedence."""
    as_flags = [flags.Flag(name, help_text) for name, help_text in SWITCHES]
    given = argparse.Namespace(
        config=args.config, **{f.name: ("1" if getattr(args, f.name) else None) for f in as_flags}
    )
    resolved = flags.resolve(given, as_flags)
    out = argparse.Namespace(**vars(args))
    for flag in as_flags:
        word = (resolved.get(flag.name) or "").strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise flags.FlagError(f"-{flag.name}: {word!r} is not true or false ({flag.env})")
        setattr(out, flag.name, word in TRUE_WORDS)
    return out


def parse(argv: Sequence[str] | None) -> Config:
    args = _switches(build_parser().parse_args(argv))
    values = flags.resolve(args, ALL_FLAGS)
    output = (values.get("output") or "text").lower()
    if output not in ("text", "json"):
        raise flags.FlagError(f"-output: {output!r} is not text or json")
    if args.detailed_exitcode and not args.dry_run:
        raise flags.FlagError("--detailed-exitcode goes with --dry-run")
    if values.get("wait") and not (args.once or args.dry_run):
        raise flags.FlagError("--wait goes with --once (the daemon does not wait)")
    metrics_address = metrics.parse_address(values.get("metrics"))
    if metrics_address is not None and (args.once or args.dry_run):
        raise flags.FlagError("-metrics goes with the daemon, not --once or --dry-run")
    verify_commits = values.get("verify_commits")
    if verify_commits and args.worktree:
        raise flags.FlagError("-verify_commits checks a commit: it does not go with --worktree")
    options = reconcile.Options(
        repo=Path(values.get("repo") or "."),
        prune=args.prune,
        allow_empty=args.allow_empty,
        force=args.force,
        dry_run=args.dry_run,
        full=args.full,
        worktree=args.worktree,
        lock_timeout=_number(values, "lock_timeout"),
        cache=not args.no_cache,
        verify_commits=Path(verify_commits) if verify_commits else None,
        signer=signing.signer_from(values),
        max_write_bytes=int(_number(values, "max_write_mib", integer=True)) * 2**20,
    )
    return Config(
        options=options,
        settings=flags.connection_settings(values),
        layout=flags.layout(values),
        once=args.once or args.dry_run,
        output=output,
        wait=_number(values, "wait") if values.get("wait") else None,
        detailed_exitcode=args.detailed_exitcode,
        interval=_number(values, "interval"),
        full_every=int(_number(values, "full_every", integer=True)),
        debounce=_number(values, "debounce"),
        pull=args.pull,
        log_values={name: values.get(name) for name in ("log", "log_level", "log_format")},
        metrics=metrics_address,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse(argv)
        # Parsed: from here on only `config` holds the credentials, not the environment
        # that /proc/<pid>/environ shows and git subprocesses inherit.
        flags.drop_credentials()
        flags.setup_logging(config.log_values, name="gleam-reconcile")
    except (flags.UsageError, flags.FlagError, connection.ConfigError) as exc:
        print(f"gleam-reconcile: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if config.once:
        return run_once(config)
    from reconciler import daemon  # watchdog and the loop are not needed for --once

    settings = daemon.LoopSettings(
        interval=config.interval,
        full_every=config.full_every,
        debounce=config.debounce,
        pull=config.pull,
        metrics=config.metrics,
    )
    return daemon.main(config.settings, config.layout, config.options, settings)


def _fail(config: Config, message: str) -> int:
    if config.output == "json":
        print(render.dumps(render.failure_json(message)))
    else:
        print(f"gleam-reconcile: {message}", file=sys.stderr)
    return EXIT_ERROR


def run_once(config: Config) -> int:
    try:
        etcd = connection.connect_reachable(config.settings)
    except connection.ETCD_ERRORS as exc:
        return _fail(
            config,
            f"cannot connect to etcd at {config.settings.describe()}: "
            f"{connection.describe_error(exc)}",
        )
    try:
        with reconcile.collector_paused():  # the output of a large pass too
            return _pass(config, etcd)
    except (MemoryError, RecursionError) as exc:
        return _fail(config, reconcile.resource_failure(exc))
    finally:
        etcd.close()


def _pass(config: Config, etcd: connection.Client) -> int:
    try:
        result = reconcile.run(sync.Store.over(etcd, config.layout), config.options)
    except manifests.InvalidManifests as exc:
        if config.output == "json":
            print(render.dumps(render.errors_json(exc.errors)))
        else:
            for error in exc.errors:
                print(str(error), file=sys.stderr)
            print(
                f"gleam-reconcile: {len(exc.errors)} error(s) in the manifests; nothing "
                "was written.",
                file=sys.stderr,
            )
        return EXIT_ERROR
    except sync.EtcdFailed as exc:
        return _fail(config, f"etcd at {config.settings.describe()}: {exc}")
    except reconcile.PASS_ERRORS as exc:
        return _fail(config, str(exc))

    # Staged region tasks: their rollout gates, right after the task transactions.
    staged = rollouts.staged_written(config.layout, result.revisions, result.desired.values)
    lines: list[str] = []
    try:
        driver, gates = rollouts.start(etcd, config.layout, staged, say=lines.append)
    except connection.ETCD_ERRORS as exc:
        return _fail(config, f"rollouts: etcd: {connection.describe_error(exc)}")

    reports = None
    status = EXIT_OK
    if config.wait is not None and not result.dry_run:
        if config.output == "text":
            print(render.text(result), flush=True)
            print("\n".join(lines), flush=True)
            lines.clear()
        # Staged keys are waited for through their rollouts, not agent by agent.
        plain = {k: r for k, r in result.revisions.items() if k not in staged_keys(config, staged)}
        try:
            # The per-wave lines as they come (text), or none (json: `rollouts`).
            driver.say = print if config.output == "text" else lines.append
            gates = rollout_driver.drive(driver, staged, timeout=config.wait) if staged else {}
            reports = client.wait_for_results(etcd, config.layout, plain, timeout=config.wait)
        except connection.ETCD_ERRORS as exc:
            return _fail(config, f"--wait: etcd: {connection.describe_error(exc)}")
        if any(r.outcome is not client.Outcome.OK for r in reports) or not rollouts.exit_ok(gates):
            status = EXIT_ERROR
        if config.output == "text":
            if plain or not staged:
                lines = render.report_lines(reports, timeout=config.wait, written=len(plain))
                print("\n".join(lines))
        else:
            doc = render.as_json(result, reports=reports, ok=status == EXIT_OK)
            print(render.dumps({**doc, "rollouts": rollouts.as_json(gates)}))
        return status

    if config.output == "json":
        print(render.dumps({**render.as_json(result), "rollouts": rollouts.as_json(gates)}))
    else:
        print(render.text(result))
        if lines:
            print("\n".join(lines))
    if result.dry_run and config.detailed_exitcode and result.plan.changes:
        return EXIT_PENDING
    return EXIT_OK


def staged_keys(config: Config, regions: list[str]) -> set[str]:
    return {config.layout.region_key(r) for r in regions}


if __name__ == "__main__":
    sys.exit(main())
