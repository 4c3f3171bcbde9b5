"""Shared flags: the original's single-dash spelling, env vars and a YAML config file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gleam import connection, flags
from tests.support import ROOT


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


def test_credentials_leave_the_environment_and_the_proc_environ_block() -> None:
    # In a process of its own: what /proc/<pid>/environ shows is the block it started with.
    code = """
import json, os, subprocess
from gleam import flags
dropped = flags.drop_credentials()
with open("/proc/self/environ", "rb") as fh:
    block = fh.read().decode()
child = subprocess.run(["env"], capture_output=True, text=True).stdout
print(json.dumps([sorted(dropped), block, child, os.environ.get("GLEAM_ETCD")]))
"""
    secrets = {
        "GLEAM_PASSWORD": "pw-must-not-leak",
        "GLEAM_USER": "user-must-not-leak",
        "GLEAM_KEY": "/key-must-not-leak",
        "GLEAM_CERT": "/cert-must-not-leak",
        "GLEAM_CACERT": "/ca-must-not-leak",
        "GLEAM_PASSWORD_FILE": "/file-must-not-leak",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLEAM_")}
    env |= {**secrets, "GLEAM_ETCD": "http://etcd-stays:2379"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    dropped, block, child, etcd = json.loads(proc.stdout)
    assert dropped == sorted(secrets)
    assert "must-not-leak" not in block + child
    # Everything else is left alone.
    assert "GLEAM_ETCD=http://etcd-stays:2379" in block and etcd == "http://etcd-stays:2379"
    assert "GLEAM_ETCD=http://etcd-stays:2379" in child


def test_password_file_is_a_connection_flag(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    values = parse(["-user", "root", "--password-file", str(secret)])
    assert flags.connection_settings(values).password == "s3cret"
    secret.chmod(0o644)
    with pytest.raises(connection.ConfigError, match="-password_file: .* has mode 0644"):
        flags.connection_settings(
            parse([], {"GLEAM_USER": "root", "GLEAM_PASSWORD_FILE": str(secret)})
        )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("umask", "mode"),
    [(0o022, 0o640), (0o000, 0o640), (0o077, 0o600)],
    ids=["umask 022", "umask 000", "umask 077"],
)
def test_a_log_file_is_created_0640(
    tmp_path: Path, restore_logging: None, umask: int, mode: int
) -> None:
    path = tmp_path / "agent.log"
    old = os.umask(umask)
    try:
        flags.setup_logging({"log": str(path)}, name="test")
    finally:
        os.umask(old)
    logging.getLogger("test").warning("hello")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert "hello" in path.read_text()


def test_an_existing_log_file_keeps_its_mode_and_content(
    tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "agent.log"
    path.write_text("earlier\n")
    path.chmod(0o600)
    flags.setup_logging({"log": str(path)}, name="test")
    logging.getLogger("test").warning("later")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("earlier\n") and "later" in path.read_text()


def test_a_log_file_made_again_after_logrotate_moves_it_is_0640_too(
    tmp_path: Path, restore_logging: None
) -> None:
    path = tmp_path / "agent.log"
    old = os.umask(0o022)
    try:
        flags.setup_logging({"log": str(path)}, name="test")
        path.rename(tmp_path / "agent.log.1")
        logging.getLogger("test").warning("after the rotation")  # the handler reopens
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "after the rotation" in path.read_text()
