"""agent.config: flags, environment variables and defaults -> AgentConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from gleam import connection, flags, keys


def parse(*argv: str, env: dict[str, str] | None = None) -> config.AgentConfig:
    cfg, _values = config.parse(list(argv), environ=env or {}, hostname="web-1.example", pid=42)
    return cfg


def test_defaults_follow_the_original() -> None:
    cfg = parse()
    assert cfg.agent_id == "web-1.example-42"
    assert cfg.regions == ()
    assert cfg.layout == keys.Layout("/gleam")
    assert cfg.script_dir == Path(config.DEFAULT_SCRIPT_DIR)
    assert (cfg.task_timeout, cfg.memory_limit, cfg.ttl) == (60.0, 64 * 1024 * 1024, 10)
    assert cfg.check_interval == 10.0
    assert cfg.pid_file is None
    assert cfg.settings.describe() == connection.DEFAULT_ENDPOINT


def test_single_and_double_dash_flags_and_the_name_alias() -> None:
    cfg = parse(
        "-etcd", "http://a:1,http://b:2", "-id", "web-1", "--region", "eu:web",
        "-script", "/srv/s", "--pid", "/run/g.pid", "-task_timeout", "2.5",
        "--memory-limit", "8", "-ttl", "3", "-prefix", "/ops",
    )  # fmt: skip
    assert cfg.agent_id == "web-1"
    assert cfg.regions == ("eu", "web")
    assert cfg.script_dir == Path("/srv/s")
    assert cfg.pid_file == Path("/run/g.pid")
    assert (cfg.task_timeout, cfg.memory_limit, cfg.ttl) == (2.5, 8 * 1024 * 1024, 3)
    assert cfg.settings.describe() == "http://a:1,http://b:2"
    assert cfg.task_keys == ("/ops/node/web-1", "/ops/region/eu", "/ops/region/web")
    assert parse("-name", "db-2").agent_id == "db-2"


def test_regions_take_commas_too() -> None:
    assert parse("-region", "eu,web:eu").regions == ("eu", "web")


def test_environment_variables_set_flags_and_the_command_line_wins() -> None:
    env = {"GLEAM_ID": "env-id", "GLEAM_REGION": "r1", "GLEAM_TASK_TIMEOUT": "7"}
    cfg = parse(env=env)
    assert (cfg.agent_id, cfg.regions, cfg.task_timeout) == ("env-id", ("r1",), 7.0)
    assert parse("-id", "cli-id", env=env).agent_id == "cli-id"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["-id", "../evil"], "-id"),
        (["-id", "x" * 200], "-id"),
        (["-region", "eu:/bad"], "-region"),
        (["-task_timeout", "soon"], "-task_timeout"),
        (["-task_timeout", "0"], "-task_timeout"),
        (["-task_timeout", "nan"], "-task_timeout"),
        (["-memory_limit", "1.5"], "-memory_limit"),
        (["-ttl", "0"], "-ttl"),
        (["-prefix", "gleam/"], "-prefix"),
        (["-cert", "/nonexistent.pem"], "-cert"),
    ],
)
def test_bad_values_raise_an_error_naming_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises((flags.FlagError, connection.ConfigError), match=flag):
        parse(*argv)


def test_an_unknown_flag_exits_2_through_argparse() -> None:
    with pytest.raises(SystemExit) as exc:
        parse("-bogus", "1")
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("web-1", "web-1-7"),
        ("web-1.example.com", "web-1.example.com-7"),
        ("h" * 300, "h" * 100 + "-7"),
        ("bad host!", "bad-host-7"),
        ("", "gleam-7"),
        ("_x_", "x-7"),
    ],
)
def test_default_id_is_hostname_dash_pid_and_always_valid(hostname: str, expected: str) -> None:
    agent_id = config.default_agent_id(hostname, 7)
    assert agent_id == expected
    keys.validate_name(agent_id, what="agent id")


def test_the_state_file_is_per_agent_id_under_state_dir() -> None:
    cfg = parse("-id", "web-1", "-state_dir", "/srv/gleam-state")
    assert cfg.state_file == Path("/srv/gleam-state/web-1.state")
    assert cfg.state_dir_given
    default = parse("-id", "web-1", env={"STATE_DIRECTORY": "/var/lib/from-systemd"})
    assert default.state_file == Path("/var/lib/from-systemd/web-1.state")
    assert not default.state_dir_given
    assert parse(env={"GLEAM_STATE_DIR": "/e"}).state_dir == Path("/e")
