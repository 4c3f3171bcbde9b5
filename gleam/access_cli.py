"""`gleam-client access`: make, show and remove Gleam's least-privilege etcd roles.

    gleam-client access grant agent web-1 -region eu:web -password_file web-1.pw
    gleam-client access grant reconciler ci -no_password     (client-certificate CN "ci")
    gleam-client access grant viewer alice -password_file alice.pw -dry_run
    gleam-client access show [NAME]
    gleam-client access revoke NAME

With `access grant`, -password_file is the NEW user's password; the connection's own
credentials (etcd's root user, or a user with the root role) then come from -user with
-password, or from GLEAM_USER/GLEAM_PASSWORD_FILE or -config. The roles are pure specs in
`gleam.access`; this module parses, connects and prints.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import TextIO

from gleam import access, connection, flags, keys
from gleam.client_render import printable

USAGE = (
    "access grant agent ID -region A:B [-script_read P]... [-script_write P]... | "
    "access grant reconciler|operator|viewer NAME | access show [NAME] | access revoke NAME"
)


AccessBody = Callable[[access.AuthAPI], int]


class AccessUsage(ValueError):
    """A mistake in the access command line; gleam-client prints it and exits 2."""


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-region", "--region", metavar="A:B", help="access grant agent: the agent's regions"
    )
    for name, what in (("script_read", "read"), ("script_write", "read and write")):
        parser.add_argument(
            f"-{name}",
            f"--{name}",
            action="append",
            default=[],
            metavar="PREFIX",
            help=f"access grant agent: a key prefix its scripts may {what} (repeatable)",
        )
    parser.add_argument(
        "-no_password",
        "--no_password",
        action="store_true",
        help="access grant: a user without a password (client-certificate CN identity)",
    )
    parser.add_argument(
        "-dry_run",
        "--dry_run",
        action="store_true",
        help="access grant: print the equivalent etcdctl commands, change nothing",
    )


def uses_access_flags(args: argparse.Namespace) -> bool:
    """Whether any flag of the access command was given (refused with other commands)."""
    return bool(
        args.region or args.script_read or args.script_write or args.no_password or args.dry_run
    )


def parse_grant(args: argparse.Namespace, layout: keys.Layout) -> access.Grant:
    if len(args.args) != 3 or args.args[1] not in {k.value for k in access.Kind}:
        raise AccessUsage(f"usage: {USAGE}")
    kind = access.Kind(args.args[1])
    try:
        regions = keys.split_regions(args.region or "")
        return access.grant_for(
            kind,
            args.args[2],
            layout,
            regions=regions,
            script_read=args.script_read,
            script_write=args.script_write,
        )
    except (keys.InvalidName, access.AccessError) as exc:
        raise AccessUsage(str(exc)) from None


def run(args: argparse.Namespace, *, environ: Mapping[str, str], out: TextIO) -> int:
    """Exit status 0 done, 1 etcd failed or refused; AccessUsage for a bad command line."""
    action = args.args[0] if args.args else None
    new_password_file = None
    if action == "grant":
        new_password_file, args.password_file = args.password_file, None
    try:
        values = flags.resolve(args, flags.CONNECTION_FLAGS, environ=environ)
        layout = flags.layout(values)
    except (flags.FlagError, connection.ConfigError) as exc:
        raise AccessUsage(str(exc)) from None
    if action == "grant":
        grant = parse_grant(args, layout)
        if bool(new_password_file) == bool(args.no_password):
            raise AccessUsage(
                "access grant: give the user's -password_file FILE (mode 0600) or "
                "-no_password (client-certificate identity)"
            )
        if args.dry_run:
            for line in access.etcdctl_commands(grant, no_password=args.no_password):
                print(line, file=out)
            return 0
        password = None
        if new_password_file:
            try:
                password = connection.read_password_file(new_password_file)
            except connection.ConfigError as exc:
                raise AccessUsage(str(exc)) from None
        return _with_auth(values, lambda api: _grant(api, grant, password, out))
    if uses_access_flags(args):
        raise AccessUsage("-region, -script_*, -no_password and -dry_run are for access grant")
    if action == "show" and len(args.args) <= 2:
        name = args.args[1] if len(args.args) == 2 else None
        return _with_auth(values, lambda api: _show(api, name, out))
    if action == "revoke" and len(args.args) == 2:
        name = args.args[1]
        return _with_auth(values, lambda api: _revoke(api, name, out))
    raise AccessUsage(f"usage: {USAGE}")


def _with_auth(values: Mapping[str, str | None], body: AccessBody) -> int:
    try:
        settings = flags.connection_settings(values)
    except (flags.FlagError, connection.ConfigError) as exc:
        raise AccessUsage(str(exc)) from None
    try:
        etcd = connection.connect_reachable(settings)
    except connection.ETCD_ERRORS as exc:
        raise access.AccessError(
            f"cannot connect to etcd at {settings.describe()}: {connection.describe_error(exc)}"
        ) from None
    try:
        return body(access.AuthAPI(etcd))
    finally:
        etcd.close()


def _grant(api: access.AuthAPI, grant: access.Grant, password: str | None, out: TextIO) -> int:
    user = api.user(grant.user)
    change = access.plan(
        grant,
        role_perms=api.role_permissions(grant.role),
        user_roles=None if user is None else user.roles,
    )
    api.apply(grant, change, password=password)
    state = "unchanged" if change.empty else "granted"
    print(f"{grant.role}: {state}, user {grant.user}", file=out)
    for perm in grant.permissions:
        print(f"  {perm.describe()}", file=out)
    return 0


def _show(api: access.AuthAPI, name: str | None, out: TextIO) -> int:
    # Names and keys come from etcd, where whoever holds root may have put a newline or
    # an escape sequence in them: shown escaped, one line each.
    names = [name] if name else api.users()
    for user_name in names:
        user = api.user(user_name)
        if user is None:
            raise access.AccessError(f"no etcd user {user_name!r}")
        roles = ", ".join(printable(role) for role in user.roles)
        print(f"{printable(user.name)}: {roles or '(no role)'}", file=out)
        for role in user.roles:
            for perm in sorted(api.role_permissions(role) or ()):
                print(f"  {printable(role)}: {printable(perm.describe())}", file=out)
    return 0


def _revoke(api: access.AuthAPI, name: str, out: TextIO) -> int:
    deleted = ", ".join(printable(role) for role in api.revoke(name))
    print(f"user {printable(name)} deleted; roles deleted: {deleted or '(none)'}", file=out)
    return 0
