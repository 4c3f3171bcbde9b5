"""Least-privilege etcd roles for Gleam (`gleam-client access grant/show/revoke`).

The role specs and the plan to reach them are pure (`grant_for`, `plan`,
`etcdctl_commands`); `AuthAPI` is the one seam to etcd's Auth API. pyetcd has no auth
methods on its client, so the seam calls the generated gRPC stub (`pyetcd.etcdrpc.AuthStub`)
on the client's own channel, with its credentials: no `etcdctl` process.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc
import pyetcd.etcdrpc as etcdrpc

from gleam import keys

ROLE_PREFIX = "gleam-"


class AccessError(ValueError):
    """A grant that cannot be made as asked, or what etcd's Auth API refused."""


class Kind(StrEnum):
    AGENT = "agent"
    RECONCILER = "reconciler"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Perm(StrEnum):
    # etcd's authpb.Permission.Type numbers
    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"

    @property
    def number(self) -> int:
        return {"read": 0, "write": 1, "readwrite": 2}[self.value]

    @classmethod
    def from_number(cls, number: int) -> Perm:
        return (cls.READ, cls.WRITE, cls.READWRITE)[number]


@dataclass(frozen=True, order=True)
class Permission:
    """One key (`prefix` False) or every key under it (`prefix` True)."""

    key: str
    prefix: bool
    perm: Perm

    @property
    def range_end(self) -> str:
        """etcd's range end for a prefix: the key with its last byte incremented."""
        return prefix_range_end(self.key) if self.prefix else ""

    def describe(self) -> str:
        return f"{self.perm.value.upper():9} {self.key}{'*' if self.prefix else ''}"


def prefix_range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return "\0"  # every key
    raw[-1] += 1
    return raw.decode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class Grant:
    """A user and its one Gleam role."""

    kind: Kind
    user: str
    role: str
    permissions: tuple[Permission, ...]


def role_name(kind: Kind, name: str) -> str:
    return f"{ROLE_PREFIX}{kind.value}-{name}"


def _script_prefix(value: str, *, flag: str) -> str:
    """A key prefix a script may use: absolute, printable, not the root of etcd."""
    if not value.startswith("/") or value.strip("/") == "" or not value.isprintable():
        raise AccessError(f"{flag}: {value!r} must be an absolute key prefix such as /app/config/")
    return value


def grant_for(
    kind: Kind,
    name: str,
    layout: keys.Layout,
    *,
    regions: Sequence[str] = (),
    script_read: Sequence[str] = (),
    script_write: Sequence[str] = (),
) -> Grant:
    """The role a `kind` called `name` gets (the README's table)."""
    keys.validate_name(name, what="agent id" if kind is Kind.AGENT else "user name")
    p = layout.prefix
    if kind is not Kind.AGENT and (regions or script_read or script_write):
        raise AccessError("-region, -script_read and -script_write are for `grant agent` only")
    perms: list[Permission]
    if kind is Kind.AGENT:
        perms = [Permission(layout.node_key(name), False, Perm.READ)]
        for region in regions:
            keys.validate_name(region, what="region")
            perms.append(Permission(layout.region_key(region), False, Perm.READ))
            perms.append(Permission(f"{p}/rollout/{region}", False, Perm.READ))
        perms.append(Permission(layout.info_key(name), False, Perm.READWRITE))
        perms.append(Permission(layout.agent_results_prefix(name), True, Perm.READWRITE))
        perms += [
            Permission(_script_prefix(s, flag="-script_read"), True, Perm.READ) for s in script_read
        ]
        perms += [
            Permission(_script_prefix(s, flag="-script_write"), True, Perm.READWRITE)
            for s in script_write
        ]
    elif kind is Kind.RECONCILER:
        perms = [
            *(Permission(f"{p}/{d}/", True, Perm.READWRITE) for d in _TASK_DIRS + ("meta",)),
            Permission(layout.info_prefix, True, Perm.READ),
            Permission(layout.results_prefix, True, Perm.READ),
        ]
    elif kind is Kind.OPERATOR:
        perms = [
            *(Permission(f"{p}/{d}/", True, Perm.READWRITE) for d in _TASK_DIRS),
            Permission(f"{p}/", True, Perm.READ),
        ]
    else:
        perms = [Permission(f"{p}/", True, Perm.READ)]
    return Grant(kind, name, role_name(kind, name), tuple(dict.fromkeys(perms)))


_TASK_DIRS = ("node", "region", "rollout")


@dataclass(frozen=True)
class Plan:
    """What to change so that etcd holds a Grant exactly."""

    add_role: bool
    grant: tuple[Permission, ...]
    revoke: tuple[Permission, ...]
    add_user: bool
    give_role: bool

    @property
    def empty(self) -> bool:
        return not (self.add_role or self.grant or self.revoke or self.add_user or self.give_role)


def plan(
    grant: Grant,
    *,
    role_perms: Iterable[Permission] | None,
    user_roles: Iterable[str] | None,
) -> Plan:
    """Pure: from what etcd holds (None: no such role / user) to the grant. Running a grant
    twice plans nothing the second time."""
    have = set(role_perms or ())
    want = set(grant.permissions)
    # A key granted with another permission type is revoked, then granted again.
    return Plan(
        add_role=role_perms is None,
        grant=tuple(sorted(want - have)),
        revoke=tuple(sorted(have - want)),
        add_user=user_roles is None,
        give_role=grant.role not in set(user_roles or ()),
    )


def etcdctl_commands(grant: Grant, *, no_password: bool) -> list[str]:
    """The etcdctl commands that make the grant from scratch (`-dry_run`)."""
    role = shlex.quote(grant.role)
    lines = [f"etcdctl role add {role}"]
    for perm in grant.permissions:
        flag = " --prefix=true" if perm.prefix else ""
        lines.append(
            f"etcdctl role grant-permission {role} {perm.perm.value} {shlex.quote(perm.key)}{flag}"
        )
    user = shlex.quote(grant.user)
    lines.append(
        f"etcdctl user add {user} --no-password"
        if no_password
        else f'etcdctl user add {user} --new-user-password="$(cat PASSWORD_FILE)"'
    )
    lines.append(f"etcdctl user grant-role {user} {role}")
    return lines


# The seam: etcd's Auth API over pyetcd's channel -----------------------------------------

# AuthUserAddRequest.options (field 3) = UserAddOptions{no_password (field 1) = true}:
# pyetcd's generated protobuf predates the field, so it goes in as serialised bytes,
# which protobuf keeps as an unknown field and sends on.
_NO_PASSWORD_OPTION = b"\x1a\x02\x08\x01"


@dataclass(frozen=True)
class UserInfo:
    name: str
    roles: tuple[str, ...]


class AuthAPI:
    """etcd's Auth API through the connected pyetcd client `etcd`."""

    def __init__(self, etcd: Any) -> None:
        self._etcd = etcd

    def _call(self, method: str, request: Any) -> Any:
        stub = etcdrpc.AuthStub(self._etcd.channel)
        try:
            return getattr(stub, method)(
                request,
                self._etcd.timeout,
                credentials=self._etcd.call_credentials,
                metadata=self._etcd.metadata,
            )
        except grpc.RpcError as exc:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise AccessError(f"etcd refused {method}: {details}") from None

    def _absent(self, method: str, request: Any) -> Any | None:
        """The answer, or None when etcd says the role or user does not exist."""
        try:
            return self._call(method, request)
        except AccessError as exc:
            if "not found" in str(exc):
                return None
            raise

    def role_permissions(self, role: str) -> list[Permission] | None:
        answer = self._absent("RoleGet", etcdrpc.AuthRoleGetRequest(role=role))
        if answer is None:
            return None
        return [_permission(p) for p in answer.perm]

    def user(self, name: str) -> UserInfo | None:
        answer = self._absent("UserGet", etcdrpc.AuthUserGetRequest(name=name))
        return None if answer is None else UserInfo(name, tuple(answer.roles))

    def users(self) -> list[str]:
        return sorted(self._call("UserList", etcdrpc.AuthUserListRequest()).users)

    def apply(self, grant: Grant, change: Plan, *, password: str | None) -> None:
        if change.add_role:
            self._call("RoleAdd", etcdrpc.AuthRoleAddRequest(name=grant.role))
        for perm in change.revoke:
            self._call(
                "RoleRevokePermission",
                etcdrpc.AuthRoleRevokePermissionRequest(
                    role=grant.role, key=perm.key.encode(), range_end=perm.range_end.encode()
                ),
            )
        for perm in change.grant:
            permission = etcdrpc.Permission(
                permType=perm.perm.number, key=perm.key.encode(), range_end=perm.range_end.encode()
            )
            self._call(
                "RoleGrantPermission",
                etcdrpc.AuthRoleGrantPermissionRequest(name=grant.role, perm=permission),
            )
        if change.add_user:
            request = etcdrpc.AuthUserAddRequest(name=grant.user, password=password or "")
            if password is None:
                request = etcdrpc.AuthUserAddRequest.FromString(
                    request.SerializeToString() + _NO_PASSWORD_OPTION
                )
            self._call("UserAdd", request)
        if change.give_role:
            self._call(
                "UserGrantRole", etcdrpc.AuthUserGrantRoleRequest(user=grant.user, role=grant.role)
            )

    def revoke(self, name: str) -> list[str]:
        """Delete user `name` and its Gleam roles; returns the roles deleted."""
        found = self.user(name)
        if found is None:
            raise AccessError(f"no etcd user {name!r}")
        self._call("UserDelete", etcdrpc.AuthUserDeleteRequest(name=name))
        deleted = []
        for role in found.roles:
            if role.startswith(ROLE_PREFIX) and role.endswith(f"-{name}"):
                self._call("RoleDelete", etcdrpc.AuthRoleDeleteRequest(role=role))
                deleted.append(role)
        return deleted


def _permission(raw: Any) -> Permission:
    key = bytes(raw.key).decode("utf-8", errors="surrogateescape")
    end = bytes(raw.range_end).decode("utf-8", errors="surrogateescape")
    prefix = bool(end) and end == prefix_range_end(key)
    return Permission(key, prefix, Perm.from_number(int(raw.permType)))


def identity(settings: Any) -> str:
    """Who etcd sees: the -user, else the client certificate's CN (etcd maps a
    certificate's CN to the user when there is no password), else ''."""
    if settings.user:
        return str(settings.user)
    if not settings.cert:
        return ""
    try:
        from cryptography import x509

        with open(settings.cert, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    except (OSError, ValueError):
        return ""
    return str(names[0].value) if names else ""
