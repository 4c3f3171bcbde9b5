"""Connection settings: a partial TLS or auth setting is an error naming the flag, never a
silent fall back to plain text; several endpoints fail over against a real etcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from gleam import connection
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
