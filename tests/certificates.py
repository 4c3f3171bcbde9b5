"""A throw-away certificate authority for TLS tests, made with the openssl command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from gleam.embedded import TLSFiles


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, subject: str, extensions: str, *, cwd: Path) -> tuple[str, str]:
    key, csr, cert, ext = (f"{name}.key", f"{name}.csr", f"{name}.pem", f"{name}.ext")
    (cwd / ext).write_text(extensions)
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", subject, cwd=cwd)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", cert, "-extfile", ext, cwd=cwd)  # fmt: skip
    return str(cwd / cert), str(cwd / key)


def make_tls_files(directory: Path) -> TLSFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by
    the CA. Raises FileNotFoundError when there is no openssl command."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_subject = "/CN=gleam test CA"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", ca_subject, cwd=directory)  # fmt: skip
    server = _signed(
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        cwd=directory,
    )
    client = _signed("client", "/CN=gleam", "extendedKeyUsage=clientAuth\n", cwd=directory)
    return TLSFiles(
        ca=str(directory / "ca.pem"),
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
    )
