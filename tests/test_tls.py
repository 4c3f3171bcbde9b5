"""TLS end to end: an etcd that serves only TLS and requires client certificates, with a
real agent, gleam-client and gleam-reconcile talking to it; and no silent fall back to
plain text when the TLS setting is wrong or missing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gleam import cli, connection, keys
from gleam.embedded import EtcdServer, TLSFiles
from tests.certificates import make_tls_files
from tests.support import ROOT, AgentProcess, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    try:
        return make_tls_files(tmp_path_factory.mktemp("pki"))
    except FileNotFoundError:
        pytest.skip("no openssl command to make test certificates")


@pytest.fixture(scope="module")
def tls_etcd(tls_files: TLSFiles) -> Iterator[EtcdServer]:
    with EtcdServer(tls=tls_files) as server:
        yield server


def tls_flags(files: TLSFiles, server: EtcdServer) -> list[str]:
    return ["-etcd", server.endpoint, "-cacert", files.ca,
            "-cert", files.client_cert, "-key", files.client_key]  # fmt: skip


def test_agent_client_and_reconciler_work_over_tls_with_client_certificates(
    tls_etcd: EtcdServer,
    tls_files: TLSFiles,
    layout: keys.Layout,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = [*tls_flags(tls_files, tls_etcd), "-prefix", layout.prefix]
    agent = start_agent(tls_etcd.endpoint, "-id", "tls-1", "-region", "secure", *flags[2:],
                        layout=layout)  # fmt: skip

    def registered() -> bool:
        capsys.readouterr()
        cli.main([*flags, "info"])
        return "tls-1" in capsys.readouterr().out

    wait_until(registered, timeout=30, what="the agent to register over TLS")

    # gleam-client over TLS: send and wait for the agent's result
    capsys.readouterr()
    code = cli.main([*flags, "-target", "tls-1", "-fn", "print", "-data", '"over tls"',
                     "-wait", "30"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out + agent.log()
    assert "ok" in out and "over tls" in out

    # gleam-reconcile over TLS, waiting for the agent too
    repo = tmp_path / "ops"
    (repo / "tasks" / "regions").mkdir(parents=True)
    (repo / "tasks" / "regions" / "secure.yaml").write_text("name: print\ndata: from git\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "tls"], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *flags, "-repo", str(repo), "-once",
         "-wait", "30"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + agent.log()
    assert "1 of 1 agent result(s) ok" in done.stdout


def test_without_a_client_certificate_the_server_refuses_and_the_client_says_so(
    tls_etcd: EtcdServer, tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["-etcd", tls_etcd.endpoint, "-cacert", tls_files.ca, "info"])
    err = capsys.readouterr().err
    assert code == 1
    assert tls_etcd.endpoint in err


def test_plain_http_to_a_tls_server_fails_rather_than_talking_plain_text(
    tls_etcd: EtcdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tls_etcd.endpoint.replace("https://", "http://")
    assert cli.main(["-etcd", plain, "info"]) == 1
    assert plain in capsys.readouterr().err


def test_tls_files_with_an_http_endpoint_are_refused_before_connecting(
    tls_etcd: EtcdServer, tls_files: TLSFiles
) -> None:
    plain = tls_etcd.endpoint.replace("https://", "http://")
    with pytest.raises(connection.ConfigError, match="endpoints are http://"):
        connection.make_settings(plain, cacert=tls_files.ca)
