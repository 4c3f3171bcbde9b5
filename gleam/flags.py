"""Command-line flags shared by gleam-agent, gleam-reconcile and gleam-client.

Flags keep the original's single-dash spelling (`-etcd`, `-log_level`); the double-dash
forms work too. Each flag can also come from the environment (`-log_level` from
`GLEAM_LOG_LEVEL`) or from a YAML config file (`-config FILE` or `GLEAM_CONFIG`, as the
original allowed). Precedence: command line, then environment, then config file, then
the default.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gleam import connection, keys, logformat, proc_environ


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    default: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    # Removed from the environment once parsed (drop_credentials): children, scripts and
    # gleam.exec programs must not see it.
    credential: bool = False

    @property
    def env(self) -> str:
        return "GLEAM_" + self.name.upper()


CONNECTION_FLAGS: tuple[Flag, ...] = (
    Flag(
        "etcd", "etcd endpoints, comma-separated", connection.DEFAULT_ENDPOINT, metavar="URL[,URL]"
    ),
    Flag("prefix", "key prefix", keys.DEFAULT_PREFIX),
    Flag(
        "cacert",
        "CA bundle to verify etcd's TLS certificate",
        aliases=("ca-file",),
        metavar="FILE",
        credential=True,
    ),
    Flag(
        "cert",
        "client certificate for TLS",
        aliases=("cert-file",),
        metavar="FILE",
        credential=True,
    ),
    Flag(
        "key", "client private key for TLS", aliases=("key-file",), metavar="FILE", credential=True
    ),
    Flag("user", "etcd user name (etcd auth)", credential=True),
    Flag(
        "password",
        "etcd password (etcd auth); -password_file keeps it out of ps and shell history",
        credential=True,
    ),
    Flag(
        "password_file",
        "file holding the etcd password (mode 0600 or stricter, owned by this user)",
        metavar="FILE",
        credential=True,
    ),
    Flag("config", "YAML file with flag values (keys are flag names)", metavar="FILE"),
)

LOG_FLAGS: tuple[Flag, ...] = (
    Flag("log", "write the log to this file instead of standard error", metavar="FILE"),
    Flag("log_level", "debug, info, warning or error", "info", metavar="LEVEL"),
    Flag("log_format", "text, or json: one JSON object per line", "text", metavar="FORMAT"),
)


class FlagError(ValueError):
    """A flag value that cannot be used; the text names the flag."""


class UsageError(ValueError):
    """Something wrong in what was typed on a command line (gleam-client's or
    gleam-reconcile's); the text names the flag, key or target."""


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Register each flag as -name, --name and --name-with-dashes (plus aliases)."""
    for flag in flags:
        spellings: list[str] = []
        for name in (flag.name, *flag.aliases):
            for form in (f"-{name}", f"--{name}", f"--{name.replace('_', '-')}"):
                if form not in spellings:
                    spellings.append(form)
        default = f" (default {flag.default})" if flag.default else ""
        parser.add_argument(
            *spellings,
            dest=flag.name,
            default=None,
            metavar=flag.metavar or flag.name.upper(),
            help=f"{flag.help}{default}; env {flag.env}",
        )


def _load_config(path: str) -> Mapping[str, Any]:
    # Imported here: only -config needs YAML, and every agent would pay ~1 MiB for it.
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise FlagError(f"-config: cannot read {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise FlagError(f"-config: {path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FlagError(f"-config: {path!r} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(
    args: argparse.Namespace,
    flags: Sequence[Flag],
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """Each flag's value by precedence: command line, environment, config file, default."""
    env = os.environ if environ is None else environ
    config_path = getattr(args, "config", None) or env.get("GLEAM_CONFIG")
    config = _load_config(config_path) if config_path else {}
    values: dict[str, str | None] = {}
    for flag in flags:
        value = getattr(args, flag.name, None)
        if value is None:
            value = env.get(flag.env)
        if value is None and flag.name in config:
            raw = config[flag.name]
            # A YAML list of endpoints or regions reads naturally; join it.
            value = ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)
        if value is None:
            value = flag.default
        values[flag.name] = value
    return values


def connection_settings(values: Mapping[str, str | None]) -> connection.Settings:
    """Settings from resolved CONNECTION_FLAGS values; raises ConfigError naming a flag."""
    return connection.make_settings(
        values.get("etcd"),
        cacert=values.get("cacert"),
        cert=values.get("cert"),
        key=values.get("key"),
        user=values.get("user"),
        password=values.get("password"),
        password_file=values.get("password_file"),
    )


def drop_credentials() -> tuple[str, ...]:
    """Remove the credential flags' variables (GLEAM_PASSWORD, GLEAM_USER, GLEAM_KEY, ...)
    from the environment, once the flags have been parsed, so that no child process, Lua
    `os.getenv` or `gleam.exec` program sees them; returns the names removed.

    Removing a variable leaves its text in the environment block the process started
    with, which /proc/<pid>/environ shows to every process of the same user (a script's
    `cat /proc/$PPID/environ`), so that text is wiped too."""
    names = tuple(f.env for f in CONNECTION_FLAGS if f.credential and f.env in os.environ)
    for name in names:
        del os.environ[name]
    proc_environ.wipe(names)
    return names


def layout(values: Mapping[str, str | None]) -> keys.Layout:
    try:
        return keys.Layout(values.get("prefix") or keys.DEFAULT_PREFIX)
    except keys.InvalidName as exc:
        raise FlagError(f"-prefix: {exc}") from None


def setup_logging(values: Mapping[str, str | None], *, name: str) -> None:
    """One line per event with time, level and logger; -log file; -log_level filter."""
    level_name = (values.get("log_level") or "info").upper()
    if level_name == "WARN":
        level_name = "WARNING"
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        raise FlagError(
            f"-log_level: {values.get('log_level')!r} is not one of debug, info, warning, error"
        )
    try:
        formatter = logformat.formatter(values.get("log_format"), name=name)
    except ValueError as exc:
        raise FlagError(f"-log_format: {exc}") from None
    path = values.get("log")
    try:
        handler = logformat.handler(path)  # a -log file is reopened after logrotate moves it
    except OSError as exc:
        raise FlagError(f"-log: cannot open {path!r}: {exc.strerror}") from None
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # gRPC and watchdog are chatty at debug level and say nothing an operator needs.
    for noisy in ("watchdog", "git", "pyetcd"):
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
