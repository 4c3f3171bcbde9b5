"""Shared flags: the original's single-dash spelling, env vars and a YAML config file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gleam import flags


def parse(argv: list[str], environ: dict[str, str] | None = None) -> dict[str, str | None]:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    flags.add_flags(parser, flags.CONNECTION_FLAGS + flags.LOG_FLAGS)
    return flags.resolve(parser.parse_args(argv), flags.CONNECTION_FLAGS + flags.LOG_FLAGS,
                         environ=environ or {})  # fmt: skip


def test_single_and_double_dash_forms() -> None:
    assert parse(["-etcd", "http://a:1"])["etcd"] == "http://a:1"
    assert parse(["--etcd", "http://a:1"])["etcd"] == "http://a:1"
    assert parse(["--log-level", "debug"])["log_level"] == "debug"
    assert parse(["-log_level", "debug"])["log_level"] == "debug"


def test_the_originals_tls_flag_names_are_aliases() -> None:
    values = parse(["-ca-file", "ca.pem", "-cert-file", "c.pem", "-key-file", "k.pem"])
    assert (values["cacert"], values["cert"], values["key"]) == ("ca.pem", "c.pem", "k.pem")


def test_precedence_is_flag_then_env_then_config_then_default(tmp_path: Path) -> None:
    config = tmp_path / "gleam.yaml"
    config.write_text("etcd: [http://c1:1, http://c2:2]\nprefix: /fromconfig\nlog-level: warning\n")
    env = {"GLEAM_CONFIG": str(config), "GLEAM_PREFIX": "/fromenv"}
    values = parse(["-log_level", "error"], env)
    assert values["etcd"] == "http://c1:1,http://c2:2"  # config (list joined)
    assert values["prefix"] == "/fromenv"  # env beats config
    assert values["log_level"] == "error"  # flag beats all
    assert parse([], {})["prefix"] == "/gleam"  # default


def test_a_bad_config_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(flags.FlagError, match="-config: .*bad.yaml"):
        parse(["-config", str(bad)])
    with pytest.raises(flags.FlagError, match="-config: cannot read"):
        parse(["-config", str(tmp_path / "missing.yaml")])


def test_bad_prefix_and_log_level_name_their_flag() -> None:
    with pytest.raises(flags.FlagError, match="-prefix"):
        flags.layout({"prefix": "gleam/"})
    with pytest.raises(flags.FlagError, match="-log_level"):
        flags.setup_logging({"log_level": "loud"}, name="test")
