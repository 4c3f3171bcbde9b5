"""The etcd key layout shared by the agent, the reconciler and the client.

Every key Gleam reads or writes is built here, from names validated here, so that no
id, region or function name can make a key (or a script path) escape its folder.
Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_PREFIX = "/gleam"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_MAX = 128
# A function segment maps to a file or folder name under the script directory, so it
# allows no dots at all: no "..", no hidden files, no extension games.
_FUNC_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_FUNC_MAX = 256
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9][A-Za-z0-9._-]*)+")


class InvalidName(ValueError):
    """A name (id, region, function, prefix) that Gleam refuses."""


def validate_name(value: str, *, what: str) -> str:
    """Return `value` if it is a valid agent id or region name, else raise InvalidName."""
    if not isinstance(value, str) or not value:
        raise InvalidName(f"{what} must be a non-empty string")
    if len(value) > _NAME_MAX:
        raise InvalidName(f"{what} {value[:40]!r}... is longer than {_NAME_MAX} characters")
    if not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"{what} {value!r} is invalid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


# Function names found valid: a fleet's manifests name a handful of functions, and each
# manifest's name is checked more than once (the quick schema check, the encoder).
_VALID_FUNCTIONS: set[str] = set()


def validate_function(name: str) -> str:
    """Return `name` if it is a valid function name such as `config::sync`."""
    if type(name) is str and name in _VALID_FUNCTIONS:
        return name
    if not isinstance(name, str) or not name:
        raise InvalidName("function name must be a non-empty string")
    if len(name) > _FUNC_MAX:
        raise InvalidName(f"function name is longer than {_FUNC_MAX} characters")
    for segment in name.split("::"):
        if not _FUNC_SEGMENT_RE.fullmatch(segment):
            raise InvalidName(
                f"function name {name!r} is invalid: segments separated by '::' may hold "
                "letters, digits, '_' and '-' only"
            )
    if type(name) is str and len(_VALID_FUNCTIONS) < 4096:
        _VALID_FUNCTIONS.add(name)
    return name


def function_path_parts(name: str) -> tuple[str, ...]:
    """`config::sync` -> ("config", "sync.lua"): the script file's path parts."""
    segments = validate_function(name).split("::")
    return (*segments[:-1], segments[-1] + ".lua")


def validate_prefix(prefix: str) -> str:
    """A key prefix such as `/gleam`: absolute, no trailing slash, valid segments."""
    if not _PREFIX_RE.fullmatch(prefix or ""):
        raise InvalidName(
            f"prefix {prefix!r} is invalid: it must look like /gleam or /ops/gleam "
            "(absolute, no trailing slash)"
        )
    return prefix


class Kind(StrEnum):
    """What a task key targets."""

    NODE = "node"
    REGION = "region"


@dataclass(frozen=True, order=True)
class Target:
    """A task key's target, independent of the prefix: `node/web-1`, `region/eu`."""

    kind: Kind
    name: str

    def __post_init__(self) -> None:
        validate_name(self.name, what="region" if self.kind is Kind.REGION else "node id")

    @property
    def path(self) -> str:
        return f"{self.kind.value}/{self.name}"

    @classmethod
    def node(cls, name: str) -> Target:
        return cls(Kind.NODE, name)

    @classmethod
    def region(cls, name: str) -> Target:
        return cls(Kind.REGION, name)

    @classmethod
    def parse(cls, path: str) -> Target:
        """Parse `node/<id>` or `region/<name>`."""
        kind, sep, name = path.partition("/")
        if not sep or kind not in (Kind.NODE.value, Kind.REGION.value):
            raise InvalidName(f"target {path!r} is not of the form node/<id> or region/<name>")
        return cls(Kind(kind), name)

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Layout:
    """Where everything lives under one prefix (default `/gleam`)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    # Task keys -------------------------------------------------------------
    def task_key(self, target: Target) -> str:
        return f"{self.prefix}/{target.path}"

    def node_key(self, node_id: str) -> str:
        return self.task_key(Target.node(node_id))

    def region_key(self, region: str) -> str:
        return self.task_key(Target.region(region))

    def tasks_prefix(self, kind: Kind) -> str:
        return f"{self.prefix}/{kind.value}/"

    def parse_task_key(self, key: str) -> Target | None:
        """The target of a task key under this prefix, or None for any other key."""
        head = self.prefix + "/"
        if not key.startswith(head):
            return None
        try:
            return Target.parse(key[len(head) :])
        except InvalidName:
            return None

    # Registrations ---------------------------------------------------------
    @property
    def info_prefix(self) -> str:
        return f"{self.prefix}/info/"

    def info_key(self, agent_id: str) -> str:
        return f"{self.info_prefix}{validate_name(agent_id, what='agent id')}"

    # Results -----------------------------------------------------------------
    @property
    def results_prefix(self) -> str:
        return f"{self.prefix}/result/"

    def agent_results_prefix(self, agent_id: str) -> str:
        return f"{self.results_prefix}{validate_name(agent_id, what='agent id')}/"

    def result_key(self, agent_id: str, target: Target) -> str:
        return f"{self.agent_results_prefix(agent_id)}{target.path}"

    def parse_result_key(self, key: str) -> tuple[str, Target] | None:
        """(agent id, target) of a result key, or None for any other key."""
        if not key.startswith(self.results_prefix):
            return None
        agent_id, sep, rest = key[len(self.results_prefix) :].partition("/")
        if not sep:
            return None
        try:
            return validate_name(agent_id, what="agent id"), Target.parse(rest)
        except InvalidName:
            return None

    # Rollout gates (gleam.rollout) ------------------------------------------------
    @property
    def rollout_prefix(self) -> str:
        return f"{self.prefix}/rollout/"

    def rollout_key(self, region: str) -> str:
        return f"{self.rollout_prefix}{validate_name(region, what='region')}"

    # Reconciler bookkeeping --------------------------------------------------
    @property
    def meta_prefix(self) -> str:
        return f"{self.prefix}/meta/"

    @functools.cached_property  # owned_key is called for every change of an apply
    def owned_prefix(self) -> str:
        """Ownership records: `<prefix>/meta/owned/<node|region>/<name>`, one per task key
        the reconciler wrote (holding the commit it came from)."""
        return f"{self.meta_prefix}owned/"

    def owned_key(self, task_key: str) -> str:
        """`/gleam/node/web-1` -> `/gleam/meta/owned/node/web-1`."""
        return self.owned_prefix + task_key[len(self.prefix) + 1 :]

    @property
    def applied_key(self) -> str:
        """The reconciler's record of its last applies (commit, time, digest, history)."""
        return f"{self.meta_prefix}applied"

    @property
    def lock_key(self) -> str:
        """The apply lock, held (bound to a lease) while a reconciler applies."""
        return f"{self.meta_prefix}lock"


def split_regions(value: str) -> tuple[str, ...]:
    """`eu:web` or `eu,web` -> ("eu", "web"), validated, duplicates dropped, order kept."""
    seen: dict[str, None] = {}
    for part in re.split(r"[:,]", value or ""):
        part = part.strip()
        if part:
            seen[validate_name(part, what="region")] = None
    return tuple(seen)
