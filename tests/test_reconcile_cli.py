"""gleam-reconcile's flags (reconciler/cli.py): worst values get an error naming the
flag, never a hang or a traceback later."""

from __future__ import annotations

import threading

import pytest

from gleam import flags
from reconciler import cli

SECONDS = ["interval", "debounce", "lock_timeout", "wait"]


@pytest.mark.parametrize("name", SECONDS)
@pytest.mark.parametrize(
    ("raw", "said"),
    [
        ("nan", "is not a finite number"),  # a deadline that never comes
        ("-nan", "is not a finite number"),
        ("inf", "is not a finite number"),
        ("1e400", "is not a finite number"),
        ("1e300", "is out of range"),  # OverflowError from a timed wait
        (str(threading.TIMEOUT_MAX * 2), "is out of range"),
        ("-1", "is out of range"),
        ("soon", "is not a number"),
    ],
)
def test_a_duration_a_wait_cannot_take_is_refused_by_name(name: str, raw: str, said: str) -> None:
    with pytest.raises(flags.FlagError, match=f"^-{name}: {raw!r} {said}$"):
        cli.parse(["--once", f"--{name}={raw}"])


@pytest.mark.parametrize("name", SECONDS)
def test_a_long_finite_duration_is_taken(name: str) -> None:
    config = cli.parse(["--once", f"--{name}", "86400.5"])
    got = {
        "interval": config.interval,
        "debounce": config.debounce,
        "lock_timeout": config.options.lock_timeout,
        "wait": config.wait,
    }[name]
    assert got == 86400.5


@pytest.mark.parametrize("raw", ["0", "-3", "1.5", "nan", "9" * 5000])
def test_full_every_is_a_whole_number_of_passes(raw: str) -> None:
    with pytest.raises(flags.FlagError, match="^-full_every: "):
        cli.parse([f"--full_every={raw}"])
