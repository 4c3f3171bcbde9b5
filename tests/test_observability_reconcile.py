"""The reconciler daemon under operations: /metrics scraped from a real daemon process
after passes (ok, drift put back, invalid), the fleet gauges equal to what `gleam-client
status` counts, /healthz through an etcd outage, systemd's notify protocol, and the
alert rules in contrib/ naming only metrics the code exports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gleam import client, keys, status
from gleam.embedded import EtcdServer
from tests.agent_support import (
    StartAgent,
    node,
    wait_registered,
)
from tests.observe_support import (
    NotifySocket,
    Samples,
    healthz,
    metrics_url,
    names,
    scrape,
    value,
)
from tests.reconcile_support import OpsRepo
from tests.support import ROOT, client_for, wait_until

ALERTS = ROOT / "contrib" / "prometheus" / "gleam-alerts.yml"

pytestmark = pytest.mark.usefixtures("no_gleam_environment")


class DaemonProcess:
    """A real `gleam-reconcile` daemon subprocess with its log in a file."""

    def __init__(self, args: list[str], *, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler.cli", *args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env},
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self) -> str:
        found = wait_until(lambda: metrics_url(self.log()), what="the daemon's metrics address")
        assert found is not None
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def start_daemon(
    daemons: list[DaemonProcess], tmp_path: Path, endpoint: str, layout: keys.Layout,
    repo: OpsRepo, *, env: dict[str, str] | None = None,
) -> DaemonProcess:  # fmt: skip
    d = DaemonProcess(
        [
            "-etcd", endpoint, "-prefix", layout.prefix, "--repo", str(repo.path),
            "--interval", "0.5", "--debounce", "0.05", "-metrics", "127.0.0.1:0",
        ],
        log_path=tmp_path / f"daemon-{len(daemons)}.log", env=env or {},
    )  # fmt: skip
    daemons.append(d)
    return d


def alert_metric_names() -> set[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    found: set[str] = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            found |= set(re.findall(r"\bgleam_[a-z0-9_]+", rule["expr"]))
    return found


def test_daemon_metrics_after_passes_and_fleet_gauges_as_status_counts_them(
    etcd_server: EtcdServer, etcd: Any, layout: keys.Layout, start_agent: StartAgent,
    lua_dir: Path, tmp_path: Path, daemons: list[DaemonProcess], notify: NotifySocket,
) -> None:  # fmt: skip
    repo = OpsRepo(tmp_path / "ops")
    repo.node("fleet-ok", "echo", "data: fine\n")
    repo.node("fleet-bad", "fail")
    repo.commit("two hosts")
    agents = [
        start_agent(
            etcd_server.endpoint, "-id", agent_id, "-metrics", "127.0.0.1:0",
            layout=layout, script_dir=lua_dir,
        )
        for agent_id in ("fleet-ok", "fleet-bad")
    ]  # fmt: skip
    for agent_id in ("fleet-ok", "fleet-bad"):
        wait_registered(etcd, layout, agent_id)
    d = start_daemon(
        daemons, tmp_path, etcd_server.endpoint, layout, repo,
        env=notify.env(watchdog_seconds=2.0),
    )  # fmt: skip
    ready = notify.wait_for("READY", "1")
    wait_until(lambda: notify.pings_after(ready), what="WATCHDOG=1 from the daemon")
    base = d.url()

    def fleet_settled() -> Samples | None:
        samples = scrape(base)
        ok = value(samples, "gleam_fleet_results", state="ok") == 1
        return samples if ok and value(samples, "gleam_fleet_results", state="failed") else None

    samples = wait_until(fleet_settled, timeout=30, what="both agents' results in the gauges")
    assert (value(samples, "gleam_reconcile_passes_total", result="ok") or 0) >= 1
    assert value(samples, "gleam_reconcile_changes_total", action="create") == 2
    assert (value(samples, "gleam_reconcile_duration_seconds_count", mode="full") or 0) >= 1
    assert (value(samples, "gleam_reconcile_last_success_timestamp_seconds") or 0) > 0
    assert value(samples, "gleam_fleet_agents") == 2
    # The same counts `gleam-client status` gives from its own read.
    fleet = status.build(
        client.read_snapshot(etcd, layout), layout=layout, now=datetime.now(UTC)
    ).counts
    for state in ("ok", "failed", "pending", "gone"):
        assert value(samples, "gleam_fleet_results", state=state) == getattr(fleet, state)
    allowed = {"result", "mode", "action", "state", "version", "le", "implementation", "major",
               "minor", "patchlevel"}  # fmt: skip
    for _name, labels in samples:
        assert {k for k, _v in labels} <= allowed

    # A key changed by hand is put back on the next interval pass, and counted.
    etcd.put(layout.task_key(node("fleet-ok")), b'{"Name": "echo", "Data": "by hand"}')
    wait_until(
        lambda: value(scrape(base), "gleam_reconcile_drift_corrections_total") == 1,
        what="the drift correction counted",
    )
    # An invalid manifest: counted as invalid; the daemon stays healthy (the repo is wrong).
    repo.write("tasks/nodes/broken.yaml", "name: [not, a, string]\n")
    repo.commit("broken")
    wait_until(
        lambda: (value(scrape(base), "gleam_reconcile_passes_total", result="invalid") or 0) >= 1,
        what="the invalid pass counted",
    )
    assert healthz(base)[0] == 200
    wait_until(lambda: "failed" in notify.last_status(), what="STATUS= of the failed pass")

    # Every metric the alert rules name is exported by the daemon or an agent.
    exported = names(samples) | names(scrape(metrics_url(agents[0].log()) or ""))
    missing = alert_metric_names() - exported
    assert not missing, f"contrib/prometheus/gleam-alerts.yml names unexported {missing}"

    assert d.stop() == 0
    notify.wait_for("STOPPING", "1", timeout=5)


def test_daemon_healthz_is_503_while_etcd_is_stopped_and_200_when_it_is_back(
    private_etcd: EtcdServer, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    layout = keys.Layout("/health-reconcile")
    repo = OpsRepo(tmp_path / "ops")
    repo.node("web-1", "print")
    repo.commit("one host")
    etcd = client_for(private_etcd.endpoint)
    try:
        d = start_daemon(daemons, tmp_path, private_etcd.endpoint, layout, repo)
        base = d.url()
        assert healthz(base)[0] in (200, 503)  # 503 "starting" until the first pass ends
        wait_until(lambda: healthz(base)[0] == 200, what="/healthz 200 after the first pass")

        private_etcd.kill()
        code, reason = wait_until(
            lambda: (got := healthz(base))[0] == 503 and got, timeout=60, what="/healthz 503"
        )
        assert "etcd" in reason
        private_etcd.start()
        wait_until(lambda: healthz(base)[0] == 200, timeout=60, what="/healthz 200 again")
        samples = scrape(base)
        assert (value(samples, "gleam_reconcile_passes_total", result="error") or 0) >= 1
    finally:
        etcd.close()


def test_metrics_with_once_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reconciler import cli

    code = cli.main(["--repo", str(tmp_path), "--once", "-metrics", "127.0.0.1:9272"])
    assert code == 1
    assert "-metrics goes with the daemon" in capsys.readouterr().err
