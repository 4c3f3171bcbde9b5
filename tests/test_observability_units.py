"""The pure parts of operations support: the sd_notify datagram, the watchdog decisions,
the -metrics address, JSON log lines, and the agent's and reconciler's health rules."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from agent import observe
from gleam import flags, liveness, logformat, metrics, sdnotify
from reconciler import daemon, desired, diff, manifests, reconcile, sync
from reconciler import observe as robserve

# sd_notify -------------------------------------------------------------------------------


def test_a_status_text_cannot_forge_another_assignment() -> None:
    data = sdnotify.encode({"STATUS": "all good\nREADY=1\r\nWATCHDOG=1"})
    assert data.count(b"\n") == 0 and data.startswith(b"STATUS=all good READY=1")


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@gleam-test", b"\0gleam-test"),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_socket_addresses(raw: str | None, address: str | bytes | None) -> None:
    assert sdnotify.socket_address(raw) == address


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # meant for another
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_period_from_the_environment(env: dict[str, str], seconds: float | None) -> None:
    assert sdnotify.watchdog_seconds(env, pid=42) == seconds


def test_notifier_sends_datagrams_and_survives_a_vanished_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    sock.close()
    path.unlink()
    assert not notifier.watchdog()  # no exception: systemd going away stops nothing
    notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = sdnotify.Notifier.from_environ({})
    assert not notifier.enabled and not notifier.ready("x")


# The watchdog's decisions ------------------------------------------------------------


def test_decide_sends_ready_once_and_pings_at_half_the_period() -> None:
    sent = liveness.Sent()
    starting = liveness.Verdict(ready=False, stalled=(), status="registering")
    fields, sent = liveness.decide(starting, sent, now=0.0, watchdog=10.0)
    assert fields == {"STATUS": "registering", "WATCHDOG": "1"}
    serving = liveness.Verdict(ready=True, stalled=(), status="watching")
    fields, sent = liveness.decide(serving, sent, now=1.0, watchdog=10.0)
    assert fields == {"READY": "1", "STATUS": "watching"}
    fields, sent = liveness.decide(serving, sent, now=5.0, watchdog=10.0)
    assert fields == {"WATCHDOG": "1"}
    fields, sent = liveness.decide(serving, sent, now=6.0, watchdog=10.0)
    assert fields == {}


def test_decide_stops_pinging_while_a_loop_is_stalled() -> None:
    sent = liveness.Sent(ready=True, status="watching")
    wedged = liveness.Verdict(ready=True, stalled=("watch loop",), status="stalled: watch")
    for now in (0.0, 10.0, 100.0):
        fields, sent = liveness.decide(wedged, sent, now=now, watchdog=1.0)
        assert "WATCHDOG" not in fields
    fields, _ = liveness.decide(
        liveness.Verdict(ready=True, stalled=(), status="watching"), sent, now=101.0, watchdog=1.0
    )
    assert fields["WATCHDOG"] == "1"


def test_without_a_watchdog_period_nothing_pings() -> None:
    fields, _ = liveness.decide(
        liveness.Verdict(True, (), "ok"), liveness.Sent(), now=0.0, watchdog=None
    )
    assert "WATCHDOG" not in fields


# -metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "address"),
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("127.0.0.1:9271", ("127.0.0.1", 9271)),
        (":9271", ("", 9271)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9271", ("::1", 9271)),
        ("metrics.example.internal:65535", ("metrics.example.internal", 65535)),
    ],
)
def test_metrics_addresses(raw: str | None, address: tuple[str, int] | None) -> None:
    assert metrics.parse_address(raw) == address


@pytest.mark.parametrize(
    "raw",
    ["9271", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536", "127.0.0.1:-1",
     "::1:9271", "[nonsense]:9271", "a b:9271", "host/../x:9271", "é:9271", "1:2:3"],
)  # fmt: skip
def test_bad_metrics_addresses_are_refused_naming_the_flag(raw: str) -> None:
    with pytest.raises(flags.FlagError, match="^-metrics: "):
        metrics.parse_address(raw)


def test_an_address_in_use_is_a_clear_error() -> None:
    from gleam import health as http

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(metrics.ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            http.Listener(
                ("127.0.0.1", port),
                metrics=lambda: (b"", "text/plain"),
                health=liveness.Health.good,
            )
    finally:
        taken.close()


# JSON logs -----------------------------------------------------------------------------


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("agent.worker", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_has_the_fields_and_the_context() -> None:
    formatter = logformat.JSONFormatter()
    with logformat.context(key="/gleam/node/web-1", revision=12):
        logformat.add_to_context(function="config::sync")
        line = formatter.format(_record("ran %s", "it", duration_ms=3.5))
    doc = json.loads(line)
    assert doc["level"] == "info" and doc["logger"] == "agent.worker"
    assert doc["message"] == "ran it" and doc["time"].endswith("Z")
    assert (doc["key"], doc["revision"], doc["function"], doc["duration_ms"]) == (
        "/gleam/node/web-1",
        12,
        "config::sync",
        3.5,
    )
    # Outside the block the task's fields are gone.
    assert "key" not in json.loads(formatter.format(_record("idle")))


def test_json_line_survives_any_text_and_keeps_one_line() -> None:
    formatter = logformat.JSONFormatter()
    nasty = 'line1\nline2 \udcff \x00 \u2028 "quoted" {'
    line = formatter.format(_record("%s", nasty, commit=object()))
    assert "\n" not in line and line.isascii()
    assert json.loads(line)["message"] == nasty


def test_json_line_carries_a_traceback() -> None:
    formatter = logformat.JSONFormatter()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(formatter.format(record))["exception"]


def test_log_format_flag_is_checked() -> None:
    with pytest.raises(flags.FlagError, match="-log_format: 'yaml' is not one of text, json"):
        flags.setup_logging({"log_format": "yaml"}, name="t")


# The agent's rules ---------------------------------------------------------------------

LIMITS = observe.Limits(check_interval=10.0, watch=30.0, worker=70.0)


def _view(**changes: object) -> observe.View:
    base: dict[str, object] = {
        "agent_id": "web-1", "keys": 3, "registered": True, "connected": True,
        "answered_age": 1.0, "watch_age": 1.0, "busy_for": None, "dead": (),
        "queued": 0, "ran": 5,
    }  # fmt: skip
    base.update(changes)
    return observe.View(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "ok", "reason"),
    [
        ({}, True, "registered as web-1"),
        ({"registered": False}, False, "not registered"),
        ({"connected": False}, False, "not connected"),
        ({"answered_age": None}, False, "has not answered"),
        ({"answered_age": 16.0}, False, "has not answered the watch for over 10s"),
        ({"watch_age": 31.0}, False, "stalled: watch loop"),
        ({"busy_for": 71.0}, False, "stalled: worker"),
        ({"busy_for": 60.0}, True, "registered"),
        ({"dead": ("results",)}, False, "results loop (thread ended)"),
    ],
)
def test_agent_health(changes: dict[str, object], ok: bool, reason: str) -> None:
    got = observe.health(_view(**changes), LIMITS)
    assert got.ok is ok and reason in got.reason


def test_agent_is_ready_when_registered_and_watching_and_stalls_stop_pings() -> None:
    assert observe.verdict(_view(), LIMITS).ready
    assert not observe.verdict(_view(connected=False), LIMITS).ready
    assert observe.verdict(_view(busy_for=100.0), LIMITS).stalled
    assert not observe.verdict(_view(connected=False, answered_age=None), LIMITS).stalled


# The reconciler's rules ----------------------------------------------------------------


def _report(error: str | None = None, cause: BaseException | None = None) -> daemon.PassReport:
    return daemon.PassReport(1, daemon.Reason.START, None, error, cause)


@pytest.mark.parametrize(
    ("cause", "result", "healthy"),
    [
        (manifests.InvalidManifests([]), robserve.PassResult.INVALID, True),
        (reconcile.GuardRefused("not a descendant"), robserve.PassResult.REFUSED, True),
        (reconcile.PruneRefused("empty"), robserve.PassResult.REFUSED, True),
        (sync.LockTimeout("held"), robserve.PassResult.ERROR, True),
        (sync.LockLost("lost"), robserve.PassResult.ERROR, False),
        (RuntimeError("bug"), robserve.PassResult.ERROR, True),
    ],
)
def test_pass_results_and_health(
    cause: BaseException, result: robserve.PassResult, healthy: bool
) -> None:
    report = _report(str(cause), cause)
    assert robserve.classify(report) is result
    assert robserve.health(report).ok is healthy


def test_reconciler_is_unhealthy_before_its_first_pass_and_after_an_etcd_failure() -> None:
    import grpc

    assert not robserve.health(None).ok
    assert robserve.health(_report()).ok

    class Unavailable(grpc.RpcError):
        pass

    assert not robserve.health(_report("etcd: unavailable", Unavailable())).ok


def test_drift_corrections_count_writes_of_an_already_applied_commit() -> None:
    from reconciler import records

    wanted = desired.Desired({}, None, "commit", "c1", "d", 0, "full")
    changes = (
        diff.Change(diff.Action.UPDATE, "/g/node/a", b"x"),
        diff.Change(diff.Action.ADOPT, "/g/node/b", b"y"),
    )
    plan = diff.Plan(changes)
    same = records.Record(commit="c1", history=())
    moved = records.Record(commit="c0", history=())
    assert robserve.drift_corrections(reconcile.Pass(wanted, same, plan, changes)) == 1
    assert robserve.drift_corrections(reconcile.Pass(wanted, moved, plan, changes)) == 0
    assert robserve.drift_corrections(reconcile.Pass(desired, None, plan, changes)) == 0


def test_once_stopping_it_says_so_once_and_pings_whatever_the_loops_do() -> None:
    sent = liveness.Sent(ready=True, status="watching")
    ending = liveness.Verdict(ready=True, stalled=("worker",), status="stopping", stopping=True)
    fields, sent = liveness.decide(ending, sent, now=0.0, watchdog=1.0)
    assert fields == {"STOPPING": "1", "STATUS": "stopping", "WATCHDOG": "1"}
    fields, sent = liveness.decide(ending, sent, now=1.0, watchdog=1.0)
    assert fields == {"WATCHDOG": "1"}


def test_no_ready_once_stopping() -> None:
    ending = liveness.Verdict(ready=True, stalled=(), status="stopping", stopping=True)
    fields, _ = liveness.decide(ending, liveness.Sent(), now=0.0, watchdog=None)
    assert "READY" not in fields and fields["STOPPING"] == "1"


# The HTTP listener ---------------------------------------------------------------------


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_listener_routes_and_survives_a_failing_handler_and_a_flood() -> None:
    import threading
    import time

    from gleam import health as http

    state = {"health": liveness.Health.bad("not yet")}

    def broken() -> tuple[bytes, str]:
        raise RuntimeError("bug")

    listener = http.Listener(("127.0.0.1", 0), metrics=broken, health=lambda: state["health"])
    listener.start()
    try:
        base = listener.url
        assert _get(base + "/healthz") == (503, b"not yet\n")
        state["health"] = liveness.Health.good("ok: fine")
        assert _get(base + "/healthz?verbose=1") == (200, b"ok: fine\n")
        assert _get(base + "/healthz", method="HEAD") == (200, b"")
        assert _get(base + "/metrics")[0] == 500
        assert _get(base + "/../../etc/passwd")[0] == 404
        assert _get(base + "/healthz", method="POST")[0] == 501

        # Idle connections that never send a request hold at most MAX_REQUESTS threads.
        threads = threading.active_count()
        idle = [socket.create_connection(listener._server.server_address[:2]) for _ in range(60)]
        # The listener has dealt with every one when all but MAX_REQUESTS were closed.
        deadline = time.monotonic() + 15
        while sum(map(_closed_by_peer, idle)) < len(idle) - http.MAX_REQUESTS:
            assert time.monotonic() < deadline, "the listener did not drop the extra connections"
        assert threading.active_count() <= threads + http.MAX_REQUESTS
        for conn in idle:
            conn.close()
        deadline = time.monotonic() + 15
        while _get_or_none(base + "/healthz") != (200, b"ok: fine\n"):
            assert time.monotonic() < deadline, "the listener did not recover from the flood"
            time.sleep(0.1)
    finally:
        listener.close()


def _get_or_none(url: str) -> tuple[int, bytes] | None:
    try:
        return _get(url)
    except OSError:
        return None


def _closed_by_peer(conn: socket.socket) -> bool:
    """True once the other end closed `conn` (waits up to 0.1 s for news)."""
    import select

    readable, _, _ = select.select([conn], [], [], 0.1)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True
