"""gleam-client access: least-privilege roles on an etcd with auth enabled, checked with
the real client under each user; an agent under its role, end to end."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyetcd.etcdrpc as etcdrpc
import pytest

from gleam import access, cli, connection, keys, messages
from gleam.embedded import EtcdServer, TLSFiles, free_port
from tests import certificates
from tests.agent_support import (
    StartAgent,
    node,
    region,
    wait_log,
    wait_registered,
    wait_result,
)
from tests.support import wait_until

ROOT_PASSWORD = "root-secret"

pytestmark = pytest.mark.usefixtures("no_gleam_environment")


def password_file(directory: Path, name: str, password: str) -> str:
    path = directory / f"{name}.pw"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def enable_auth(etcd: Any, *, root_password: str | None) -> None:
    """A root user (with a password, or none for certificate identity), then auth on."""
    api = access.AuthAPI(etcd)
    # The first TLS handshake with a just-started etcd can fail once; the channel retries.
    wait_until(lambda: api.users() is not None, what="etcd's Auth API to answer")
    root = access.Grant(access.Kind.VIEWER, "root", "root", ())
    api.apply(
        root,
        access.Plan(add_role=False, grant=(), revoke=(), add_user=True, give_role=True),
        password=root_password,
    )
    api._call("AuthEnable", etcdrpc.AuthEnableRequest())


@pytest.fixture(scope="module")
def auth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def auth_etcd(auth_dir: Path) -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        plain = connection.connect(connection.make_settings(server.endpoint))
        try:
            enable_auth(plain, root_password=ROOT_PASSWORD)
        finally:
            plain.close()
        yield server


@pytest.fixture
def as_root(
    auth_etcd: EtcdServer, auth_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """Run gleam-client as etcd's root user: (exit status, stdout, stderr)."""
    root_password_file = password_file(auth_dir, "root", ROOT_PASSWORD)

    def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        # Set for each run: gleam-client drops them from the environment once read.
        monkeypatch.setenv("GLEAM_USER", "root")
        monkeypatch.setenv("GLEAM_PASSWORD_FILE", root_password_file)
        capsys.readouterr()
        code = cli.main(["-etcd", auth_etcd.endpoint, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def client_as(server: EtcdServer, user: str, password: str) -> Any:
    return connection.connect(
        connection.make_settings(server.endpoint, user=user, password=password)
    )


def allowed(what: Callable[[], object]) -> bool:
    try:
        what()
    except connection.ETCD_ERRORS as exc:
        assert "PERMISSION_DENIED" in connection.describe_error(exc), exc
        return False
    return True


def check_role(etcd: Any, layout: keys.Layout, expected: dict[str, bool]) -> None:
    p = layout.prefix
    operations: dict[str, Callable[[], object]] = {
        "read own node": lambda: etcd.get(f"{p}/node/web-1"),
        "read other node": lambda: etcd.get(f"{p}/node/web-2"),
        "read region": lambda: etcd.get(f"{p}/region/eu"),
        "read rollout": lambda: etcd.get(f"{p}/rollout/eu"),
        "read results": lambda: etcd.get(f"{p}/result/web-2/node/web-2"),
        "write own node": lambda: etcd.put(f"{p}/node/web-1", "x"),
        "write other node": lambda: etcd.put(f"{p}/node/web-2", "x"),
        "write region": lambda: etcd.put(f"{p}/region/eu", "x"),
        "write own info": lambda: etcd.put(f"{p}/info/web-1", "x"),
        "write other info": lambda: etcd.put(f"{p}/info/web-2", "x"),
        "write own result": lambda: etcd.put(f"{p}/result/web-1/node/web-1", "x"),
        "write other result": lambda: etcd.put(f"{p}/result/web-2/node/web-2", "x"),
        "write meta": lambda: etcd.put(f"{p}/meta/applied", "x"),
        "write rollout": lambda: etcd.put(f"{p}/rollout/eu", "x"),
        "read outside": lambda: etcd.get("/elsewhere/x"),
        "write script prefix": lambda: etcd.put(f"/app{p}/web-1/state", "x"),
    }
    got = {name: allowed(operations[name]) for name in expected}
    assert got == expected


AGENT = {
    "read own node": True, "read other node": False, "read region": True,
    "read rollout": True, "read results": False, "write own node": False,
    "write other node": False, "write region": False, "write own info": True,
    "write other info": False, "write own result": True, "write other result": False,
    "write meta": False, "read outside": False, "write script prefix": True,
}  # fmt: skip
RECONCILER = {
    "read other node": True, "read results": True, "write other node": True,
    "write region": True, "write rollout": True, "write meta": True,
    "write own info": False, "write own result": False, "read outside": False,
}  # fmt: skip
# The operator's list is the reconciler's without the bookkeeping under meta/.
OPERATOR = {**RECONCILER, "write meta": False}
VIEWER = {
    "read other node": True, "read results": True, "read region": True,
    "write other node": False, "write region": False, "write meta": False,
    "write own info": False, "read outside": False,
}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("agent", AGENT), ("reconciler", RECONCILER), ("operator", OPERATOR), ("viewer", VIEWER)],
)
def test_each_role_can_do_exactly_its_list(
    kind: str,
    expected: dict[str, bool],
    auth_etcd: EtcdServer,
    auth_dir: Path,
    as_root: Callable[..., tuple[int, str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    layout = keys.Layout(f"/t{uuid.uuid4().hex[:10]}")
    name = "web-1" if kind == "agent" else f"{kind}-{uuid.uuid4().hex[:6]}"
    extra = ["-region", "eu", "-script_write", f"/app{layout.prefix}/web-1/"]
    code, out, err = as_root(
        "-prefix", layout.prefix, "access", "grant", kind, name,
        *(extra if kind == "agent" else []),
        "-password_file", password_file(auth_dir, name, f"{name}-pw"),
        capsys=capsys,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert out.startswith(f"gleam-{kind}-{name}: granted, user {name}")
    etcd = client_as(auth_etcd, name, f"{name}-pw")
    try:
        check_role(etcd, layout, expected)
    finally:
        etcd.close()
    code, out, _ = as_root("access", "revoke", name, capsys=capsys)
    assert code == 0 and f"gleam-{kind}-{name}" in out


def test_grant_is_idempotent_and_show_dry_run_and_revoke_say_what_they_do(
    auth_dir: Path,
    as_root: Callable[..., tuple[int, str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pw = password_file(auth_dir, "web-9", "pw9")
    grant = ("access", "grant", "agent", "web-9", "-region", "eu:web", "-password_file", pw)
    assert as_root(*grant, capsys=capsys)[1].startswith("gleam-agent-web-9: granted")
    assert as_root(*grant, capsys=capsys)[1].startswith("gleam-agent-web-9: unchanged")
    # Fewer regions: the role is narrowed to exactly the new list.
    code, out, _ = as_root(*grant[:5], "eu", *grant[6:], capsys=capsys)
    assert code == 0 and out.startswith("gleam-agent-web-9: granted")
    code, out, _ = as_root("access", "show", "web-9", capsys=capsys)
    assert out.splitlines()[0] == "web-9: gleam-agent-web-9"
    assert "/gleam/region/eu" in out and "/gleam/region/web" not in out
    assert "READWRITE /gleam/result/web-9/*" in out

    code, out, _ = as_root(*grant, "-dry_run", capsys=capsys)
    assert code == 0
    assert out.splitlines()[:3] == [
        "etcdctl role add gleam-agent-web-9",
        "etcdctl role grant-permission gleam-agent-web-9 read /gleam/node/web-9",
        "etcdctl role grant-permission gleam-agent-web-9 read /gleam/region/eu",
    ]
    assert (
        "etcdctl role grant-permission gleam-agent-web-9 readwrite /gleam/result/web-9/ "
        "--prefix=true" in out
    )
    assert "etcdctl user add web-9 --new-user-password=" in out
    assert as_root("access", "revoke", "web-9", capsys=capsys)[0] == 0
    code, _, err = as_root("access", "revoke", "web-9", capsys=capsys)
    assert code == 1 and "no etcd user 'web-9'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grant", "agent", "web-1"], "give the user's -password_file FILE"),
        (["grant", "agent", "../x", "-no_password"], "agent id '../x' is invalid"),
        (["grant", "king", "x", "-no_password"], "usage: access grant agent"),
        (["grant", "viewer", "x", "-no_password", "-region", "eu"], "for `grant agent` only"),
        (["grant", "agent", "w", "-no_password", "-script_read", "/"], "-script_read: '/'"),
        (["show", "-dry_run"], "are for access grant"),
        (["revoke"], "usage:"),
        (["-target", "node/x", "-fn", "print"], "-target is for sending without a command"),
    ],
)
def test_bad_access_command_lines_exit_2_naming_the_problem(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["access", *argv]) == 2
    assert message in capsys.readouterr().err


def test_agent_under_its_role_runs_tasks_and_is_denied_the_rest(
    auth_etcd: EtcdServer,
    auth_dir: Path,
    as_root: Callable[..., tuple[int, str, str]],
    start_agent: StartAgent,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    layout = keys.Layout(f"/t{uuid.uuid4().hex[:10]}")
    pw = password_file(auth_dir, "web-1", "web-1-pw")
    code, _, err = as_root(
        "-prefix", layout.prefix, "access", "grant", "agent", "web-1", "-region", "eu",
        "-script_write", "/allowed/", "-password_file", pw, capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "kv.lua").write_text(
        'local err = gleam.Set(gleam.Data.key, "v", 0)\nreturn tostring(err)\n'
    )
    env = {"GLEAM_USER": "web-1", "GLEAM_PASSWORD_FILE": pw}
    # A dead endpoint first in the list: the agent authenticates on the next one in turn.
    endpoints = f"http://127.0.0.1:{free_port()},{auth_etcd.endpoint}"
    agent = start_agent(endpoints, "-id", "web-1", "-region", "eu", layout=layout,
                        script_dir=scripts, env=env)  # fmt: skip
    root = client_as(auth_etcd, "root", ROOT_PASSWORD)
    try:
        wait_registered(root, layout, "web-1")
        for target, key in ((node("web-1"), "/allowed/x"), (region("eu"), "/forbidden/x")):
            task = messages.Task("kv", {"key": key})
            revision = int(root.put(layout.task_key(target), task.encode()).header.revision)
            got = wait_result(root, layout, "web-1", target, revision)
            assert got.ok
        assert got.result is not None and "permission denied" in str(got.result)
        assert wait_result(root, layout, "web-1", node("web-1"), 0).result == "nil"

        # A region the role does not cover: exit 2 at start, naming the key and the user.
        denied = start_agent(auth_etcd.endpoint, "-id", "web-1", "-region", "eu:us",
                             layout=layout, script_dir=scripts, env=env)  # fmt: skip
        assert denied.wait() == 2
        assert (
            f"cannot read {layout.region_key('us')}: permission denied for etcd user web-1"
            in denied.log()
        )
        # A result write the role no longer allows: an error naming key and user, dropped.
        api = access.AuthAPI(root)
        result_perm = access.Permission(layout.agent_results_prefix("web-1"), True,
                                        access.Perm.READWRITE)  # fmt: skip
        api.apply(
            access.grant_for(access.Kind.AGENT, "web-1", layout, regions=["eu"]),
            access.Plan(False, (), (result_perm,), False, False),
            password=None,
        )
        root.put(layout.node_key("web-1"), messages.Task("kv", {"key": "/allowed/y"}).encode())
        result_key = layout.result_key("web-1", node("web-1"))
        wait_log(agent, f"result {result_key} was refused by etcd and is dropped: "
                 "permission denied for etcd user web-1")  # fmt: skip
    finally:
        root.close()
    assert agent.stop() == 0
    wait_until(lambda: "revoked lease" in agent.log(), what="the lease revoked")


@pytest.fixture(scope="module")
def cn_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[TLSFiles, dict[str, tuple[str, str]]]:
    try:
        files = certificates.make_tls_files(tmp_path_factory.mktemp("cn"))
    except FileNotFoundError:
        pytest.skip("no openssl command to make certificates")
    directory = Path(files.ca).parent
    made = {
        cn: certificates._signed(cn, f"/CN={cn}", "extendedKeyUsage=clientAuth\n", cwd=directory)
        for cn in ("root", "web-1")
    }
    return files, made


def test_client_certificate_identity_is_the_cn(
    cn_files: tuple[TLSFiles, dict[str, tuple[str, str]]],
    start_agent: StartAgent,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files, made = cn_files
    layout = keys.Layout(f"/t{uuid.uuid4().hex[:10]}")
    with EtcdServer(tls=files) as server:

        def as_cn(cn: str) -> Any:
            return connection.connect(connection.make_settings(
                server.endpoint, cacert=files.ca, cert=made[cn][0], key=made[cn][1]))  # fmt: skip

        first = as_cn("root")
        try:
            enable_auth(first, root_password=None)
        finally:
            first.close()
        root_flags = ["-etcd", server.endpoint, "-cacert", files.ca, "-cert", made["root"][0],
                      "-key", made["root"][1], "-prefix", layout.prefix]  # fmt: skip
        monkeypatch.delenv("GLEAM_USER", raising=False)
        code = cli.main([*root_flags, "access", "grant", "agent", "web-1", "-region", "eu",
                         "-no_password"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        etcd = as_cn("web-1")
        try:
            check_role(etcd, layout, {**AGENT, "write script prefix": False})
        finally:
            etcd.close()
        agent = start_agent(server.endpoint, "-id", "web-1", "-region", "eu", "-cacert", files.ca,
                            "-cert", made["web-1"][0], "-key", made["web-1"][1],
                            layout=layout)  # fmt: skip
        root = as_cn("root")
        try:
            wait_registered(root, layout, "web-1")
            revision = int(root.put(layout.region_key("eu"), b'{"Name":"print"}').header.revision)
            assert wait_result(root, layout, "web-1", region("eu"), revision).ok
        finally:
            root.close()
        denied = start_agent(server.endpoint, "-id", "web-1", "-region", "us", "-cacert", files.ca,
                             "-cert", made["web-1"][0], "-key", made["web-1"][1],
                             layout=layout)  # fmt: skip
        assert denied.wait() == 2
        assert "permission denied for etcd user web-1" in denied.log()
        agent.stop()
    assert os.path.exists(made["web-1"][0])


def test_a_denied_registration_is_an_error_naming_key_and_user_and_tasks_still_run(
    auth_etcd: EtcdServer,
    auth_dir: Path,
    start_agent: StartAgent,
) -> None:
    layout = keys.Layout(f"/t{uuid.uuid4().hex[:10]}")
    root = client_as(auth_etcd, "root", ROOT_PASSWORD)
    try:
        grant = access.grant_for(access.Kind.AGENT, "web-3", layout)
        without_info = tuple(p for p in grant.permissions if p.key != layout.info_key("web-3"))
        api = access.AuthAPI(root)
        api.apply(
            grant,
            access.plan(
                dataclasses.replace(grant, permissions=without_info),
                role_perms=None,
                user_roles=None,
            ),
            password="pw3",
        )
        pw = password_file(auth_dir, "web-3", "pw3")
        agent = start_agent(auth_etcd.endpoint, "-id", "web-3", layout=layout,
                            env={"GLEAM_USER": "web-3", "GLEAM_PASSWORD_FILE": pw})  # fmt: skip
        wait_log(agent, f"registration: cannot write {layout.info_key('web-3')}: permission "
                 "denied for etcd user web-3; not registering")  # fmt: skip
        revision = int(root.put(layout.node_key("web-3"), b'{"Name":"print"}').header.revision)
        assert wait_result(root, layout, "web-3", node("web-3"), revision).ok
        assert agent.log().count("registration: cannot write") == 1
        api.revoke("web-3")
    finally:
        root.close()


def test_access_flags_are_refused_with_other_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-target", "node/x", "-fn", "print", "-dry_run"]) == 2
    assert "are for the access command" in capsys.readouterr().err


def test_show_and_revoke_escape_what_etcd_holds() -> None:
    import io

    from gleam import access_cli

    evil = "ops\x1b]0;owned\x07\nroot: READWRITE /"
    perm = access.Permission("/gleam/node/\x1b[2J", False, access.Perm.READ)

    class API:
        def users(self) -> list[str]:
            return [evil]

        def user(self, name: str) -> access.UserInfo:
            return access.UserInfo(name, (evil,))

        def role_permissions(self, role: str) -> list[access.Permission]:
            return [perm]

        def revoke(self, name: str) -> list[str]:
            return [evil]

    out = io.StringIO()
    access_cli._show(API(), None, out)  # type: ignore[arg-type]
    access_cli._revoke(API(), evil, out)  # type: ignore[arg-type]
    text = out.getvalue()
    assert "\x1b" not in text and text.count("\n") == 3  # three lines, nothing raw
    assert "ops\\x1b]0;owned\\x07\\nroot: READWRITE /" in text


def test_with_auth_a_dead_first_endpoint_is_skipped_and_a_wrong_password_is_not_retried(
    auth_etcd: EtcdServer, auth_dir: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = connection.make_settings(
        f"{dead},{auth_etcd.endpoint}", user="root", password=ROOT_PASSWORD, timeout=2.0
    )
    with pytest.raises(connection.ETCD_ERRORS) as failed:
        connection.connect(settings, start=0)  # authenticates on the dead one
    assert connection.unreachable(failed.value)
    client = connection.connect_reachable(settings)
    try:
        assert access.AuthAPI(client).users() is not None  # authenticated, as root
    finally:
        client.close()
    wrong = dataclasses.replace(settings, password="not the password")
    with pytest.raises(connection.ETCD_ERRORS) as refused:
        connection.connect_reachable(wrong)
    assert not connection.unreachable(refused.value)
