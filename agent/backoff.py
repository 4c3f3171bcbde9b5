"""Jittered exponential backoff between reconnect attempts.

Each failure doubles the delay up to a cap of a few seconds; the delay is drawn from the
upper half of that range ("equal jitter") so that agents that lost etcd together do not
come back in lock-step, yet no attempt follows its failure at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.1
    cap: float = 3.0
    factor: float = 2.0
    rng: Callable[[], float] = field(default=random.random)
    failures: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        ceiling = min(self.cap, self.initial * self.factor ** min(self.failures, 30))
        self.failures += 1
        return ceiling / 2 + self.rng() * ceiling / 2

    def reset(self) -> None:
        """A success: the next failure starts from `initial` again."""
        self.failures = 0
