"""Test-only fault injection. Nothing here does anything unless a test sets the variable.

`GLEAM_TEST_WEDGE=watch` (or `worker`, `reconcile`, `apply`; several with commas) makes
that loop block forever the next time it reaches its wedge point, as a loop stuck in a
call that never returns would: the tests use it to check that the systemd watchdog pings
stop. `apply` stops gleam-reconcile after its first transaction of an apply, for a test to
kill it between two transactions.
Never set it in production.
"""

from __future__ import annotations

import logging
import os
import threading

ENV = "GLEAM_TEST_WEDGE"

log = logging.getLogger("gleam.testhooks")

# Read once: the variable is set when a test starts the process.
_WEDGED = frozenset(filter(None, os.environ.get(ENV, "").split(",")))


def wedge_point(loop: str) -> None:
    """Block this thread forever when $GLEAM_TEST_WEDGE names `loop` (tests only)."""
    if loop in _WEDGED:
        log.warning("%s=%s: the %s loop is wedged on purpose", ENV, ",".join(_WEDGED), loop)
        threading.Event().wait()
