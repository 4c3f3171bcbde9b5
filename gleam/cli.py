"""gleam-client: send a task by hand, list what is in etcd, and show the fleet's status.

    gleam-client -etcd URL -target web-1:eu -fn config::sync -data '{"path": "/etc/app.conf"}'
    gleam-client [flags] info | node | region | status | call <key> <fn> [data]

This module parses flags, talks to etcd through `gleam.client`, and prints what
`gleam.client_render` makes of the answers; target resolution and the status model are pure
code elsewhere. Exit codes: 0 ok, 1 failure (etcd, a task that failed or did not
answer), 2 usage (bad flags, data, function or target; nothing written); `status` exits
1 also when a result record or registration cannot be read, and 2 when a targeted
agent is still pending.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from gleam import (
    access,
    access_cli,
    client,
    client_render,
    connection,
    etcdapi,
    flags,
    keys,
    messages,
    rollout_cli,
    signing,
    status,
    targeting,
)
from gleam.version import VERSION

PROG = "gleam-client"
COMMANDS = ("info", "node", "region", "call", "status", "access", "rollout")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# pyetcd's errors, and those of the typed seam (gleam.etcdapi) that wrap them.
ETCD_FAILURES: tuple[type[BaseException], ...] = (*connection.ETCD_ERRORS, etcdapi.EtcdError)

EPILOG = """\
commands:
  (none)                    send -fn with -data to every -target (one etcd transaction)
  info                      list live agents and their registrations
  node | region             list node or region task keys and their values
  call KEY FN [DATA]        send FN with DATA to one task key (/gleam/node/web-1 or node/web-1)
  status                    live agents, and per task key what each targeted agent made of it
  rollout status [REGION]   rollouts (waves) and their state; promote REGION admits the
  rollout promote|abort R   next wave now, abort admits no more (see "Rollouts")
  access grant|show|revoke  least-privilege etcd roles: access grant agent|reconciler|operator|
                            viewer NAME; show [NAME]; revoke NAME (see "Securing a fleet")

targets (-target, several split by ':' or ','):
  node/ID, region/NAME      explicit
  NAME                      the live agent with that id, or the region live agents watch;
                            a name that is both or neither is refused (write node/ or region/)

exit codes:
  0 ok; 1 failure (etcd unreachable, a task failed or did not answer within -wait);
  2 usage error (nothing written); status: 1 something failed or cannot be read,
  2 something pending
"""


class DataError(flags.UsageError):
    """`-data` (or call's DATA) is not JSON, or its file cannot be read."""


@dataclass(frozen=True)
class Output:
    out: TextIO
    json: bool
    colour: bool

    def text(self, text: str, *, empty: str = "") -> None:
        """Print `text`; when there is none, say `empty` on standard error (so that a
        script reading standard output still sees nothing)."""
        if text:
            print(text, file=self.out)
        elif empty:
            print(f"{PROG}: {empty}", file=sys.stderr)

    def document(self, doc: Mapping[str, Any]) -> None:
        print(client_render.to_json(doc), file=self.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send Gleam tasks by hand, list agents and task keys, show fleet status.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help=", ".join(COMMANDS))
    parser.add_argument("args", nargs="*", metavar="ARG", help="call's KEY FN [DATA]")
    parser.add_argument(
        "-target",
        "--target",
        action="append",
        default=[],
        metavar="T[:T]",
        help="where to send: node/ID, region/NAME or a bare name; several split by ':'",
    )
    parser.add_argument("-fn", "--fn", metavar="NAME", help="Lua function, e.g. config::sync")
    parser.add_argument(
        "-data",
        "--data",
        metavar="JSON",
        help="the task's data as JSON, @FILE to read it from a file, @- from standard input "
        "(default null)",
    )
    parser.add_argument(
        "-wait",
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait this long for the targeted live agents' results; exit 1 if any failed "
        "or did not answer",
    )
    parser.add_argument(
        "-rollout",
        "--rollout",
        metavar="WAVES",
        help="send a staged region task in waves, e.g. '1,25%%,100%%' (see \"Rollouts\"); "
        "with -wait, drive the rollout until it completes",
    )
    parser.add_argument(
        "-output",
        "--output",
        choices=("text", "json"),
        default="text",
        help="text for people, json for scripts (default text)",
    )
    parser.add_argument("-version", "--version", action="version", version=f"{PROG} {VERSION}")
    flags.add_flags(parser, (*flags.CONNECTION_FLAGS, signing.FLAG))
    access_cli.add_flags(parser)
    return parser


# The most `-data @FILE` or `@-` reads. A task holds at most messages.MAX_MESSAGE_BYTES;
# its data's JSON text may be indented, but not eight times over. Without a bound,
# @/dev/zero or a runaway pipe would be read until memory ran out.
MAX_DATA_TEXT = 8 * messages.MAX_MESSAGE_BYTES


def _read_data(source: TextIO, what: str, flag: str) -> str:
    try:
        text = source.read(MAX_DATA_TEXT + 1)
    except UnicodeDecodeError:
        raise DataError(f"{flag}: {what} is not UTF-8 text") from None
    if len(text) > MAX_DATA_TEXT:
        raise DataError(
            f"{flag}: {what} holds over {MAX_DATA_TEXT} characters; a task holds at most "
            f"{messages.MAX_MESSAGE_BYTES} bytes"
        )
    return text


def parse_data(value: str | None, *, flag: str = "-data") -> messages.JSON:
    """JSON text, `@path` naming a file of JSON, or `@-` for standard input; None means
    JSON null."""
    if value is None:
        return None
    if value == "@-":
        source = "standard input"
        text = _read_data(sys.stdin, source, flag)
    elif value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as fh:
                text = _read_data(fh, f"file {path!r}", flag)
        except OSError as exc:
            raise DataError(f"{flag}: cannot read file {path!r}: {exc.strerror}") from None
        source = f"file {path!r}"
    else:
        text, source = value, "value"
    try:
        return json.loads(text)  # type: ignore[no-any-return]  # json.loads is typed Any
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{flag}: {source} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); a string needs JSON quotes, e.g. -data '\"text\"'"
        ) from None
    except RecursionError:
        raise DataError(f"{flag}: {source} is nested too deeply") from None
    except ValueError as exc:  # json.loads raises a bare ValueError past Python's digit limit
        if "integer string conversion" in str(exc):
            raise DataError(
                f"{flag}: {source} holds an integer of more than {messages.MAX_INT_DIGITS} digits"
            ) from None
        raise DataError(f"{flag}: {source} cannot be read as JSON: {exc}") from None


def make_task(function: str | None, data: messages.JSON, *, flag: str = "-fn") -> messages.Task:
    if not function:
        raise flags.UsageError(f"{flag}: a function name is required (e.g. {flag} config::sync)")
    try:
        keys.validate_function(function)
        task = messages.Task(function, data)
        task.encode()  # size and serialisability, checked before anything is written
    except (keys.InvalidName, messages.MessageError) as exc:
        raise flags.UsageError(f"{flag}: {exc}") from None
    return task


def parse_call_key(value: str, layout: keys.Layout) -> keys.Target:
    """`/gleam/node/web-1` (a full key under the prefix) or `node/web-1`."""
    if value.startswith("/"):
        target = layout.parse_task_key(value)
        if target is None:
            raise flags.UsageError(
                f"call: key {value!r} is not a task key under {layout.prefix}: use "
                f"{layout.prefix}/node/<id> or {layout.prefix}/region/<name>"
            )
        return target
    try:
        return keys.Target.parse(value)
    except keys.InvalidName as exc:
        raise flags.UsageError(f"call: key {value!r}: {exc}") from None


# Commands -------------------------------------------------------------------------------


def _deliver(
    etcd: connection.Client,
    layout: keys.Layout,
    targets: Sequence[keys.Target],
    task: messages.Task,
    *,
    wait: float | None,
    output: Output,
    signer: signing.Signer | None = None,
) -> int:
    try:
        revision = client.send_tasks(etcd, layout, targets, task, signer=signer)
    except client.SendConflict as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except messages.MessageError as exc:  # too large once signed: nothing written
        raise flags.UsageError(f"-sign_key: {exc}") from None
    task_keys = sorted(layout.task_key(t) for t in targets)
    if wait is None:
        if output.json:
            output.document(client_render.send_document(task_keys, revision, task))
        else:
            output.text(client_render.sent_text(task_keys, revision))
        return EXIT_OK
    reports = client.wait_for_results(
        etcd, layout, {key: revision for key in task_keys}, timeout=wait
    )
    answered = {r.key for r in reports}
    unwatched = [key for key in task_keys if key not in answered]
    if output.json:
        output.document(
            client_render.send_document(
                task_keys, revision, task, reports=reports, unwatched=unwatched
            )
        )
    else:
        output.text(client_render.sent_text(task_keys, revision))
        output.text(
            client_render.reports_text(
                reports, timeout=wait, unwatched=unwatched, colour=output.colour
            )
        )
    all_ok = all(r.outcome is client.Outcome.OK for r in reports)
    return EXIT_OK if all_ok and not unwatched else EXIT_FAILURE


def cmd_send(
    args: argparse.Namespace, etcd: connection.Client, layout: keys.Layout, output: Output
) -> int:
    specs = targeting.split_specs(args.target)
    if not specs:
        raise flags.UsageError("-target: give at least one target (node/ID, region/NAME or a name)")
    task = make_task(args.fn, parse_data(args.data))
    agents = client.list_agents(etcd, layout) if targeting.needs_agents(specs) else []
    try:
        targets = targeting.resolve(specs, agents)
    except targeting.TargetError as exc:
        raise flags.UsageError("\n".join(exc.problems)) from None
    if args.rollout is not None:  # a staged task: gleam.rollout_cli
        try:
            task = rollout_cli.staged_task(task.name, task.data, args.rollout)
            return rollout_cli.send(
                etcd, layout, targets, task, wait=args.wait, json_output=output.json,
                say=output.text, signer=args.signer,
            )  # fmt: skip
        except rollout_cli.RolloutUsage as exc:
            raise flags.UsageError(str(exc)) from None
    return _deliver(etcd, layout, targets, task, wait=args.wait, output=output, signer=args.signer)


def cmd_call(
    args: argparse.Namespace, etcd: connection.Client, layout: keys.Layout, output: Output
) -> int:
    if len(args.args) not in (2, 3):
        raise flags.UsageError(
            "call: expected KEY FN [DATA], e.g. call /gleam/node/web-1 print '{}'"
        )
    target = parse_call_key(args.args[0], layout)
    data = parse_data(args.args[2] if len(args.args) == 3 else None, flag="call DATA")
    task = make_task(args.args[1], data, flag="call FN")
    return _deliver(etcd, layout, [target], task, wait=args.wait, output=output, signer=args.signer)


def cmd_info(etcd: connection.Client, layout: keys.Layout, output: Output) -> int:
    agents, invalid = client.read_agents(etcd, layout)
    if output.json:
        output.document(client_render.agents_document(agents, invalid))
    else:
        output.text(
            client_render.agents_text(agents, layout, invalid),
            empty=f"no live agent under {layout.info_prefix}",
        )
    return EXIT_OK


def cmd_list(kind: keys.Kind, etcd: connection.Client, layout: keys.Layout, output: Output) -> int:
    entries = client.list_tasks(etcd, layout, kind)
    if output.json:
        output.document(client_render.tasks_document(entries))
    else:
        output.text(
            client_render.tasks_text(entries),
            empty=f"no task key under {layout.tasks_prefix(kind)}",
        )
    return EXIT_OK


def cmd_status(etcd: connection.Client, layout: keys.Layout, output: Output) -> int:
    snapshot = client.read_snapshot(etcd, layout)
    now = datetime.now(UTC)
    fleet = status.build(snapshot, layout=layout, now=now, invalid=snapshot.invalid)
    fleet = status.with_rollouts(fleet, rollout_cli.read_gates(etcd, layout))
    if output.json:
        output.document(client_render.status_document(fleet))
    else:
        output.text(client_render.status_text(fleet, colour=output.colour))
    return fleet.exit_code


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that the chosen command would silently ignore."""
    command = args.command
    # NaN fails every comparison, so `< 0` would pass it, and a wait until `now >= nan`
    # would never end (polling etcd without a pause); inf would never end either.
    if args.wait is not None and not 0 <= args.wait < math.inf:
        raise flags.UsageError(
            f"-wait: SECONDS must not be negative, nan or infinite (got {args.wait})"
        )
    if command is None:
        if args.args:
            raise flags.UsageError(f"unexpected argument {args.args[0]!r}")
        if not args.target and not args.fn:
            raise flags.UsageError(
                "nothing to do: give -target and -fn to send a task, or a command: "
                + ", ".join(COMMANDS)
            )
        return
    if command not in COMMANDS:
        raise flags.UsageError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    for flag, value in (("-target", args.target), ("-fn", args.fn), ("-data", args.data)):
        if value:
            raise flags.UsageError(f"{flag} is for sending without a command, not with {command!r}")
    if args.rollout is not None:
        raise flags.UsageError(f"-rollout is for sending a task, not with {command!r}")
    if command == "rollout":
        return
    if command != "call" and args.args:
        raise flags.UsageError(f"{command}: unexpected argument {args.args[0]!r}")
    if command != "call" and args.wait is not None:
        raise flags.UsageError(f"-wait is for sending a task, not with {command!r}")


def run(args: argparse.Namespace, *, environ: Mapping[str, str], out: TextIO) -> int:
    if args.command == "access":
        return _access(args, environ=environ, out=out)
    if access_cli.uses_access_flags(args):
        raise flags.UsageError(
            "-region, -script_read, -script_write, -no_password and -dry_run are for the "
            "access command"
        )
    _check_flags(args)
    try:
        values = flags.resolve(args, flags.CONNECTION_FLAGS, environ=environ)
        layout = flags.layout(values)
        settings = flags.connection_settings(values)
        args.signer = signing.signer_from(flags.resolve(args, (signing.FLAG,), environ=environ))
    except (flags.FlagError, connection.ConfigError) as exc:
        raise flags.UsageError(str(exc)) from None
    output = Output(
        out=out,
        json=args.output == "json",
        colour=out.isatty() and "NO_COLOR" not in environ,
    )
    try:
        etcd = connection.connect_reachable(settings)
        try:
            if args.command is None:
                return cmd_send(args, etcd, layout, output)
            if args.command == "call":
                return cmd_call(args, etcd, layout, output)
            if args.command == "info":
                return cmd_info(etcd, layout, output)
            if args.command == "status":
                return cmd_status(etcd, layout, output)
            if args.command == "rollout":
                try:
                    return rollout_cli.run(
                        args.args, etcd, layout, json_output=output.json, say=output.text
                    )
                except rollout_cli.RolloutUsage as exc:
                    raise flags.UsageError(str(exc)) from None
            return cmd_list(keys.Kind(args.command), etcd, layout, output)
        finally:
            etcd.close()
    except ETCD_FAILURES as exc:
        print(f"{PROG}: {etcd_failure(settings, etcdapi.pyetcd_error(exc))}", file=sys.stderr)
        return EXIT_FAILURE


def _access(args: argparse.Namespace, *, environ: Mapping[str, str], out: TextIO) -> int:
    for flag, value in (("-target", args.target), ("-fn", args.fn), ("-data", args.data)):
        if value:
            raise flags.UsageError(f"{flag} is for sending without a command, not with 'access'")
    try:
        return access_cli.run(args, environ=environ, out=out)
    except access_cli.AccessUsage as exc:
        raise flags.UsageError(str(exc)) from None
    except access.AccessError as exc:
        print(f"{PROG}: access: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def etcd_failure(settings: connection.Settings, exc: BaseException) -> str:
    """One line naming the endpoints: unreachable, or what etcd answered."""
    code = getattr(exc, "code", None)
    unavailable = callable(code) and getattr(code(), "name", "") == "UNAVAILABLE"
    if isinstance(exc, connection.UNREACHABLE_ERRORS) or unavailable:
        return f"cannot reach etcd at {settings.describe()} ({connection.describe_error(exc)})"
    return f"etcd at {settings.describe()} failed: {connection.describe_error(exc)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    # The flags are read from this copy; the credentials leave the environment (and
    # /proc/<pid>/environ, which any process of the user can read while -wait runs).
    environ = dict(os.environ)
    flags.drop_credentials()
    try:
        return run(args, environ=environ, out=sys.stdout)
    except flags.UsageError as exc:
        for line in str(exc).splitlines():
            print(f"{PROG}: {line}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RecursionError) as exc:
        # Stored values are decoded strictly and bounded, so this is the last line of
        # defence: one line, never a traceback.
        what = (
            "ran out of memory" if isinstance(exc, MemoryError) else "met a value nested too deeply"
        )
        print(f"{PROG}: {what}; stopped", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
