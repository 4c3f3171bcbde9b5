"""Connection settings: a partial TLS or auth setting is an error naming the flag, never a
silent fall back to plain text; several endpoints fail over against a real etcd."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gleam import connection, protected_files
from gleam.embedded import EtcdServer, free_port


def test_endpoints_parse_with_and_without_scheme() -> None:
    settings = connection.make_settings("http://10.0.0.1:2379, 10.0.0.2:4001,localhost")
    assert [str(a) for a in settings.addresses] == [
        "http://10.0.0.1:2379",
        "http://10.0.0.2:4001",
        "http://localhost:2379",
    ]
    assert not settings.secure


def test_default_endpoint_is_local() -> None:
    assert connection.make_settings(None).describe() == "http://127.0.0.1:2379"


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    path = tmp_path / "x.pem"
    path.write_text("not really a certificate")
    return path


def test_cert_without_key_is_an_error(pem: Path) -> None:
    with pytest.raises(connection.ConfigError, match="-cert was given without -key"):
        connection.make_settings("https://a:2379", cacert=str(pem), cert=str(pem))


def test_key_without_cert_is_an_error(pem: Path) -> None:
    with pytest.raises(connection.ConfigError, match="-key was given without -cert"):
        connection.make_settings("https://a:2379", key=str(pem))


def test_tls_files_with_http_endpoints_are_an_error(pem: Path) -> None:
    with pytest.raises(connection.ConfigError, match="endpoints are http://"):
        connection.make_settings("http://a:2379", cacert=str(pem))


def test_tls_files_make_bare_endpoints_https(pem: Path) -> None:
    settings = connection.make_settings("a:2379", cacert=str(pem))
    assert settings.secure and settings.describe() == "https://a:2379"


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(connection.ConfigError, match="-cacert: file .* does not exist"):
        connection.make_settings("https://a:2379", cacert=str(tmp_path / "nope.pem"))


def test_mixed_schemes_are_an_error() -> None:
    with pytest.raises(connection.ConfigError, match="mixes"):
        connection.make_settings("http://a:2379,https://b:2379")


def test_user_without_password_is_an_error() -> None:
    with pytest.raises(connection.ConfigError, match="-user was given without -password"):
        connection.make_settings("http://a:2379", user="root")


@pytest.mark.parametrize("bad", ["ftp://a:1", "http://a:notaport", "http://a:2379/v2", ","])
def test_bad_endpoints_are_named(bad: str) -> None:
    with pytest.raises(connection.ConfigError, match="-etcd"):
        connection.make_settings(bad)


def test_a_client_fails_over_to_a_live_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = connection.make_settings(f"{dead},{etcd_server.endpoint}", timeout=2.0)
    client = connection.connect(settings)
    try:
        # Whichever endpoint pyetcd starts on, a retry after a failure reaches the live one.
        for _ in range(4):
            try:
                client.put("/failover-test", "ok")
                break
            except connection.ETCD_ERRORS:
                continue
        else:
            pytest.fail("never reached the live endpoint")
        assert client.get("/failover-test")[0] == b"ok"
    finally:
        client.close()


def test_a_one_shot_client_starts_on_an_endpoint_that_answers(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for endpoints in (f"{dead},{etcd_server.endpoint}", f"{etcd_server.endpoint},{dead}"):
        settings = connection.make_settings(endpoints, timeout=2.0)
        for _ in range(3):  # not a matter of luck: every time, the first call works
            client = connection.connect_reachable(settings)
            try:
                client.put("/reachable-test", "ok")
            finally:
                client.close()
    # connect starts where it is told (pyetcd alone picks at random).
    two = connection.make_settings(f"{dead},{etcd_server.endpoint}")
    for start in (0, 1, 2):
        client = connection.connect(two, start=start)
        try:
            assert client._current_endpoint_label == list(client.endpoints)[start % 2]
        finally:
            client.close()
    # None answers: the last one's error, which says so.
    nobody = connection.make_settings(f"{dead},http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(connection.ETCD_ERRORS) as failed:
        connection.connect_reachable(nobody)
    assert connection.unreachable(failed.value)


# -password_file -------------------------------------------------------------------------


def secret_file(tmp_path: Path, content: bytes = b"s3cret\n", mode: int = 0o600) -> Path:
    path = tmp_path / "etcd-password"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def with_file(path: Path) -> connection.Settings:
    return connection.make_settings("http://a:2379", user="root", password_file=str(path))


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (b"s3cret\n", "s3cret"),
        (b"s3cret", "s3cret"),
        (b"s3cret\r\n", "s3cret"),
        (b" two words \n\n", " two words \n"),  # one newline dropped, nothing else
        ("pässwörd\n".encode(), "pässwörd"),
    ],
)
def test_password_file_gives_the_password_without_its_trailing_newline(
    tmp_path: Path, content: bytes, password: str
) -> None:
    assert with_file(secret_file(tmp_path, content)).password == password


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_password_file_of_mode_0600_or_stricter_is_accepted(tmp_path: Path, mode: int) -> None:
    assert with_file(secret_file(tmp_path, mode=mode)).password == "s3cret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_password_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret_file(tmp_path, mode=mode)
    with pytest.raises(connection.ConfigError, match=f"-password_file: .* has mode {mode:04o}"):
        with_file(path)


def test_password_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    st = secret_file(tmp_path).stat()
    # The check itself, for a file owned by uid st_uid read by someone else.
    with pytest.raises(protected_files.Refused, match="owned by uid .*not by this user"):
        protected_files.check(
            "f", st, rule=protected_files.Rule.PRIVATE, what="password file", uid=st.st_uid + 1
        )
    if os.geteuid() == 0:  # and for real, where the test may give the file away
        path = secret_file(tmp_path)
        os.chown(path, 4242, 4242)
        with pytest.raises(connection.ConfigError, match="owned by uid 4242"):
            with_file(path)


def test_password_file_may_be_a_symlink_to_a_safe_file(tmp_path: Path) -> None:
    # Kubernetes and systemd hand secrets out through symlinks; the file itself is checked.
    link = tmp_path / "link"
    link.symlink_to(secret_file(tmp_path))
    assert with_file(link).password == "s3cret"
    (tmp_path / "etcd-password").chmod(0o644)
    with pytest.raises(connection.ConfigError, match="has mode 0644"):
        with_file(link)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "cannot open .*No such file"),
        (lambda p: p, "is not a regular file"),  # a directory
        (lambda p: Path("/dev/null"), "is not a regular file"),
        (lambda p: (os.mkfifo(p / "fifo", 0o600), p / "fifo")[1], "is not a regular file"),
        (lambda p: secret_file(p, b""), "is empty"),
        (lambda p: secret_file(p, b"\n"), "is empty"),
        (lambda p: secret_file(p, b"\xff\xfe\n"), "is not UTF-8 text"),
        (lambda p: secret_file(p, b"x" * (64 * 1024 + 1)), "is over 65536 bytes"),
    ],
)
def test_password_file_that_cannot_hold_a_password_is_named(
    tmp_path: Path, make: Any, message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(connection.ConfigError, match=f"^-password_file: .*{message}"):
        with_file(path)


def test_password_and_password_file_together_are_an_error(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    with pytest.raises(connection.ConfigError, match="-password and -password_file were both"):
        connection.make_settings("http://a:2379", user="u", password="p", password_file=str(path))


def test_password_file_without_user_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(connection.ConfigError, match="-password_file was given without -user"):
        connection.make_settings("http://a:2379", password_file=str(secret_file(tmp_path)))


def test_auth_over_http_gets_a_warning_and_over_https_none(tmp_path: Path) -> None:
    plain = connection.make_settings("http://a:2379", user="u", password="p")
    assert "clear text" in (plain.clear_text_auth_warning() or "")
    assert connection.make_settings("http://a:2379").clear_text_auth_warning() is None
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    tls = connection.make_settings("https://a:2379", cacert=str(pem), user="u", password="p")
    assert tls.clear_text_auth_warning() is None
