"""gleam-agent's flags, turned into one frozen AgentConfig.

The connection and log flags are the shared ones (`gleam.flags`); this module adds the
agent's own (`-id`, `-region`, `-script`, `-pid`, ...), keeps the original's single-dash
spelling, and reads each from `GLEAM_<NAME>` or the `-config` YAML file when it is not on
the command line. Parsing is pure apart from what `gleam.flags.resolve` reads (the
environment and the config file); checking that the script directory exists is left to
the caller.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import inflight, lua_api
from gleam import connection, flags, keys, metrics
from gleam.version import VERSION

PROG = "gleam-agent"

DEFAULT_SCRIPT_DIR = "/etc/gleam/scripts"

AGENT_FLAGS: tuple[flags.Flag, ...] = (
    flags.Flag(
        "id",
        "this agent's id; watches <prefix>/node/<id> (default <hostname>-<pid>; "
        "give a stable id so that tasks written while the agent was down run on restart)",
        aliases=("name",),
    ),
    flags.Flag("region", "regions to watch, separated by ':' or ','", metavar="A:B"),
    flags.Flag("script", "directory of Lua scripts", DEFAULT_SCRIPT_DIR, metavar="DIR"),
    flags.Flag("pid", "write the process id to this file", metavar="FILE"),
    flags.Flag(
        "state_dir",
        "directory of the state file that records the task in hand, so that a task that "
        "crashes the agent twice is not run again (default: $STATE_DIRECTORY, "
        "/var/lib/gleam for root, else ~/.local/state/gleam)",
        metavar="DIR",
    ),
    flags.Flag(
        "task_timeout", "seconds a task may run before it is stopped", "60", metavar="SECONDS"
    ),
    flags.Flag("memory_limit", "Lua memory cap per task, in MiB", "64", metavar="MIB"),
    flags.Flag(
        "ttl",
        "seconds the registration outlives a silent agent (lease TTL)",
        "10",
        metavar="SECONDS",
    ),
    flags.Flag(
        "trust",
        "run only tasks signed by one of the ssh-ed25519 public keys in this file "
        "(authorized_keys lines; re-read on SIGHUP)",
        metavar="FILE",
    ),
    flags.Flag(
        "check_interval",
        "seconds between checks that the watch has delivered every change",
        "10",
        metavar="SECONDS",
    ),
)

# A switch (no value): `-takeover` on the command line, GLEAM_TAKEOVER=1 or `takeover:
# true` in the -config file (agent/preflight.py says what it does).
TAKEOVER = flags.Flag(
    "takeover",
    "start even if another live agent holds this id's registration; that agent then exits",
)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})

ALL_FLAGS: tuple[flags.Flag, ...] = (
    *flags.CONNECTION_FLAGS,
    *AGENT_FLAGS,
    *flags.LOG_FLAGS,
    metrics.FLAG,  # -metrics HOST:PORT (agent/observe.py)
)

_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to know, validated."""

    settings: connection.Settings
    layout: keys.Layout
    agent_id: str
    regions: tuple[str, ...]
    script_dir: Path
    pid_file: Path | None
    state_dir: Path
    state_dir_given: bool  # -state_dir set, not the default: trouble with it is fatal
    task_timeout: float
    memory_limit: int  # bytes
    ttl: int
    check_interval: float
    trust_file: Path | None = None  # -trust: only signed tasks run (agent/trust.py)
    takeover: bool = False  # -takeover: replace another live agent's registration

    @property
    def targets(self) -> tuple[keys.Target, ...]:
        """The task keys this agent watches: its node key, then each region's."""
        return (
            keys.Target.node(self.agent_id),
            *(keys.Target.region(r) for r in self.regions),
        )

    @property
    def task_keys(self) -> tuple[str, ...]:
        return tuple(self.layout.task_key(t) for t in self.targets)

    @property
    def state_file(self) -> Path:
        """The file that records the task in hand (agent.inflight): one per agent id."""
        return self.state_dir / f"{self.agent_id}.state"

    def executor_options(self) -> lua_api.ExecutorOptions:
        """What the Lua executor process is started with."""
        return lua_api.ExecutorOptions(
            self.script_dir, self.agent_id, self.regions, self.task_timeout, self.memory_limit
        )


def default_agent_id(hostname: str, pid: int) -> str:
    """`<hostname>-<pid>` as the original did, made into a valid id (odd characters
    replaced, length capped) so that an unusual host name cannot stop the agent."""
    cleaned = _ID_BAD_CHARS.sub("-", hostname).strip("-._") or "gleam"
    return f"{cleaned[:100]}-{pid}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Watch this host's node key and its regions' keys in etcd and run the "
        "named Lua function for each task written there.",
        allow_abbrev=False,
    )
    flags.add_flags(parser, ALL_FLAGS)
    parser.add_argument(
        "-takeover",
        "--takeover",
        dest=TAKEOVER.name,
        action="store_const",
        const="1",
        default=None,
        help=f"{TAKEOVER.help}; env {TAKEOVER.env}",
    )
    parser.add_argument("-version", "--version", action="version", version=f"{PROG} {VERSION}")
    return parser


def _number(values: Mapping[str, str | None], name: str, *, integer: bool, minimum: float) -> float:
    raw = values.get(name)
    try:
        value = int(str(raw)) if integer else float(str(raw))
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise flags.FlagError(f"-{name}: {raw!r} is not {kind}") from None
    if not value >= minimum:  # also refuses NaN
        raise flags.FlagError(f"-{name}: {raw!r} must be at least {minimum:g}")
    return value


def from_values(
    values: Mapping[str, str | None],
    *,
    hostname: str,
    pid: int,
    default_state_dir: Path = Path("/var/lib/gleam"),
) -> AgentConfig:
    """Build the config from resolved flag values; raises FlagError or ConfigError, whose
    text names the flag."""
    agent_id = values.get("id") or default_agent_id(hostname, pid)
    try:
        keys.validate_name(agent_id, what="agent id")
    except keys.InvalidName as exc:
        raise flags.FlagError(f"-id: {exc}") from None
    try:
        regions = keys.split_regions(values.get("region") or "")
    except keys.InvalidName as exc:
        raise flags.FlagError(f"-region: {exc}") from None
    script = values.get("script") or DEFAULT_SCRIPT_DIR
    pid_file = values.get("pid")
    state_dir = values.get("state_dir")
    return AgentConfig(
        settings=flags.connection_settings(values),
        layout=flags.layout(values),
        agent_id=agent_id,
        regions=regions,
        script_dir=Path(script).expanduser().absolute(),
        pid_file=Path(pid_file).expanduser().absolute() if pid_file else None,
        state_dir=Path(state_dir or default_state_dir).expanduser().absolute(),
        state_dir_given=bool(state_dir),
        task_timeout=_number(values, "task_timeout", integer=False, minimum=0.001),
        memory_limit=int(_number(values, "memory_limit", integer=True, minimum=1)) * 1024 * 1024,
        ttl=int(_number(values, "ttl", integer=True, minimum=1)),
        check_interval=_number(values, "check_interval", integer=False, minimum=0.1),
        trust_file=Path(trust).expanduser().absolute() if (trust := values.get("trust")) else None,
        takeover=_switch(values, TAKEOVER),
    )


def _switch(values: Mapping[str, str | None], flag: flags.Flag) -> bool:
    word = (values.get(flag.name) or "").strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise flags.FlagError(f"-{flag.name}: {word!r} is not true or false ({flag.env})")
    return word in TRUE_WORDS


def parse(
    argv: Sequence[str] | None,
    *,
    environ: Mapping[str, str] | None = None,
    hostname: str | None = None,
    pid: int | None = None,
) -> tuple[AgentConfig, dict[str, str | None]]:
    """Parse the command line: (config, resolved values, which the log set-up reads).

    An unknown flag exits 2 through argparse; a bad value raises FlagError/ConfigError."""
    args = build_parser().parse_args(argv)
    values = flags.resolve(args, (*ALL_FLAGS, TAKEOVER), environ=environ)
    config = from_values(
        values,
        hostname=socket.gethostname() if hostname is None else hostname,
        pid=os.getpid() if pid is None else pid,
        default_state_dir=inflight.default_directory(
            os.environ if environ is None else environ, euid=os.geteuid()
        ),
    )
    return config, values
