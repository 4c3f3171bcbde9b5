"""gleam-agent -trust end to end: real etcd, a real agent, signed and forged messages."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gleam import keys, messages, signing
from gleam.embedded import EtcdServer
from tests.agent_support import (
    StartAgent,
    node,
    put_raw,
    region,
    wait_log,
    wait_registered,
    wait_result,
)
from tests.support import client_for
from tests.test_signing import public_line

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_gleam_environment")]


def current_prev(etcd: Any, key: str) -> int:
    """P as a writer takes it: the key's mod_revision, or etcd's revision if absent."""
    value, meta = etcd.get(key)
    if value is not None:
        return int(meta.mod_revision)
    return int(etcd.get_response(key).header.revision)


def put_signed(
    etcd: Any, layout: keys.Layout, target: keys.Target, task: messages.Task, signer: Any
) -> tuple[int, bytes]:
    key = layout.task_key(target)
    raw = signing.sign_task(task, key=key, prev=current_prev(etcd, key), signer=signer)
    return put_raw(etcd, layout, target, raw), raw


def outcome(etcd: Any, layout: keys.Layout, target: keys.Target, revision: int) -> str | None:
    got = wait_result(etcd, layout, "web-1", target, revision)
    assert got.revision == revision
    return got.error if not got.ok else None


def test_agent_with_trust_runs_only_properly_signed_tasks(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent, tmp_path: Path
) -> None:
    signer = signing.Signer.from_key(Ed25519PrivateKey.generate())
    stranger = signing.Signer.from_key(Ed25519PrivateKey.generate())
    trust_file = tmp_path / "trusted_keys"
    trust_file.write_text(public_line(signer) + "\n")
    agent = start_agent(
        etcd_server.endpoint, "-id", "web-1", "-region", "eu", "-trust", str(trust_file),
        layout=layout,
    )  # fmt: skip
    wait_registered(etcd, layout, "web-1")
    me, eu = node("web-1"), region("eu")
    task = messages.Task("print", {"n": 1})

    first, first_raw = put_signed(etcd, layout, me, task, signer)
    assert outcome(etcd, layout, me, first) is None
    revision, _ = put_signed(etcd, layout, eu, task, signer)
    assert outcome(etcd, layout, eu, revision) is None

    revision = put_raw(etcd, layout, me, task.encode())
    assert outcome(etcd, layout, me, revision) == "signature: missing"
    revision, _ = put_signed(etcd, layout, me, task, stranger)
    assert outcome(etcd, layout, me, revision) == f"signature: unknown key {stranger.fingerprint}"
    _, good = put_signed(etcd, layout, me, task, signer)
    forged = json.loads(good)
    forged["Data"] = {"n": 2}
    revision = put_raw(etcd, layout, me, json.dumps(forged).encode())
    assert outcome(etcd, layout, me, revision) == "signature: invalid"
    web2 = layout.node_key("web-2")
    copied = signing.sign_task(task, key=web2, prev=current_prev(etcd, web2), signer=signer)
    revision = put_raw(etcd, layout, me, copied)
    assert outcome(etcd, layout, me, revision) == f"signature: made for {web2}"

    last, _ = put_signed(etcd, layout, me, task, signer)
    assert outcome(etcd, layout, me, last) is None
    revision = put_raw(etcd, layout, me, first_raw)  # an old, once good message again
    first_prev = json.loads(first_raw)["Sig"]["prev"]
    assert outcome(etcd, layout, me, revision) == (
        f"signature: replay of an older task (prev {first_prev} < last run {last})"
    )
    assert "not run: signature: replay" in agent.log()

    # Key rotation: SIGHUP re-reads the file; the stranger's key is now trusted.
    trust_file.write_text(public_line(signer) + "\n" + public_line(stranger) + "\n")
    agent.signal(signal.SIGHUP)
    wait_log(agent, "-trust: 2 trusted key(s)")
    revision, _ = put_signed(etcd, layout, me, task, stranger)
    assert outcome(etcd, layout, me, revision) is None


def test_trust_file_without_a_key_stops_the_agent_with_a_usage_error(
    etcd_server: EtcdServer, layout: keys.Layout, start_agent: StartAgent, tmp_path: Path
) -> None:
    bad = tmp_path / "trusted_keys"
    bad.write_text("ssh-rsa AAAAB3NzaC1yc2E= old\n")
    agent = start_agent(etcd_server.endpoint, "-id", "web-1", "-trust", str(bad), layout=layout)
    assert agent.wait() == 2
    assert f"-trust: {bad} line 1: not an ssh-ed25519 public key" in agent.log()


def key_file(directory: Path, signer: signing.Signer) -> str:
    from cryptography.hazmat.primitives import serialization

    path = directory / "sign_key"
    path.write_bytes(
        signer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return str(path)


def test_hand_sent_and_reconciled_tasks_signed_by_their_writers_run(
    etcd_server: EtcdServer,
    etcd: Any,
    layout: keys.Layout,
    start_agent: StartAgent,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gleam import cli
    from tests.reconcile_support import OpsRepo, run_cli

    signer = signing.Signer.from_key(Ed25519PrivateKey.generate())
    trust_file = tmp_path / "trusted_keys"
    trust_file.write_text(public_line(signer) + "\n")
    sign_key = key_file(tmp_path, signer)
    start_agent(etcd_server.endpoint, "-id", "web-1", "-region", "eu", "-trust", str(trust_file),
                layout=layout)  # fmt: skip
    wait_registered(etcd, layout, "web-1")
    me, eu = node("web-1"), region("eu")
    client_flags = ["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, "-sign_key", sign_key]
    for _ in range(2):  # the second send's P is the first one's revision: not a replay
        capsys.readouterr()
        code = cli.main([*client_flags, "-target", "node/web-1:region/eu", "-fn", "print",
                         "-wait", "30"])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
    raw, _meta = etcd.get(layout.node_key("web-1"))
    assert json.loads(raw)["Sig"]["key"] == signer.fingerprint

    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", "print", "data:\n  n: 7\n")
    repo.region("eu", "print", "data:\n  n: 8\n")
    repo.commit("first")
    code, _out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "-sign_key", sign_key)
    assert code == 0, err
    for target, n in ((me, 7), (eu, 8)):
        raw, meta = etcd.get(layout.task_key(target))
        got = wait_result(etcd, layout, "web-1", target, int(meta.mod_revision))
        assert got.ok and got.result == {"n": n}, got
    # Its own signed values are what it wants: the next full pass writes nothing.
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "-sign_key", sign_key,
                             "--full")  # fmt: skip
    assert code == 0 and out.startswith("No changes"), out + err
    # An older signed value written again (a replay) is refused, and put right by the next
    # pass, signed afresh.
    old, _ = etcd.get(layout.node_key("web-1"))
    repo.node("web-1", "print", "data:\n  n: 9\n")
    repo.commit("second")
    assert run_cli(capsys, etcd_server.endpoint, layout, repo, "-sign_key", sign_key)[0] == 0
    revision = put_raw(etcd, layout, me, old)
    refused = wait_result(etcd, layout, "web-1", me, revision).error
    assert refused is not None and refused.startswith(
        f"signature: replay of an older task (prev {json.loads(old)['Sig']['prev']} < last run "
    ), refused
    code, out, err = run_cli(capsys, etcd_server.endpoint, layout, repo, "-sign_key", sign_key,
                             "--full")  # fmt: skip
    assert code == 0 and "1 updated" in out, out + err
    raw, meta = etcd.get(layout.node_key("web-1"))
    got = wait_result(etcd, layout, "web-1", me, int(meta.mod_revision))
    assert got.ok and got.result == {"n": 9}


def test_a_bad_sign_key_is_a_usage_error_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gleam import cli

    bad = tmp_path / "key"
    bad.write_text("nope")
    assert cli.main(["-sign_key", str(bad), "-target", "node/x", "-fn", "print"]) == 2
    assert f"-sign_key: {str(bad)!r} has mode 0644" in capsys.readouterr().err
    bad.chmod(0o600)
    assert cli.main(["-sign_key", str(bad), "-target", "node/x", "-fn", "print"]) == 2
    assert f"-sign_key: {bad}: not an OpenSSH private key" in capsys.readouterr().err


def test_a_hand_sent_task_too_large_once_signed_is_a_usage_error_and_nothing_is_written(
    etcd_server: Any, layout: keys.Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gleam import cli

    sign_key = key_file(tmp_path, signing.Signer.from_key(Ed25519PrivateKey.generate()))
    data = tmp_path / "data.json"
    overhead = len(messages.Task("print", "").encode())
    data.write_text(json.dumps("x" * (messages.MAX_MESSAGE_BYTES - overhead - 10)))
    argv = ["-etcd", etcd_server.endpoint, "-prefix", layout.prefix, "-sign_key", sign_key]
    code = cli.main([*argv, "-target", "node/big", "-fn", "print", "-data", f"@{data}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"-sign_key: task message for {layout.node_key('big')} is " in err
    assert "once signed, over the 1048576-byte limit agents accept" in err
    etcd = client_for(etcd_server.endpoint)
    try:
        assert etcd.get(layout.node_key("big"))[0] is None
    finally:
        etcd.close()
