"""Capped exponential back-off with full jitter, for re-watching and reconnecting.

The n-th wait after a failure is uniform in [0, min(cap, initial * 2**n)] ("full jitter"): a
thousand sidecars that lost the same node spread their retries over the whole window instead
of arriving together, and no one waits longer than ``cap``. ``reset`` after a healthy stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable

INITIAL_S = 0.1
CAP_S = 5.0


class Backoff:
    def __init__(
        self,
        initial_s: float = INITIAL_S,
        cap_s: float = CAP_S,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if not 0 < initial_s <= cap_s:
            raise ValueError(f"need 0 < initial_s <= cap_s, got {initial_s}, {cap_s}")
        self.initial_s = initial_s
        self.cap_s = cap_s
        self._uniform = uniform
        self._attempt = 0

    @property
    def ceiling_s(self) -> float:
        """The most the next wait may be."""
        # The exponent stops growing once past the cap (no float overflow however long it fails).
        return min(self.cap_s, self.initial_s * 2 ** min(self._attempt, 62))

    def next(self) -> float:
        """Seconds to wait before the next attempt; each call widens the window."""
        wait = self._uniform(0.0, self.ceiling_s)
        if self.initial_s * 2**self._attempt < self.cap_s:
            self._attempt += 1
        return wait

    def reset(self) -> None:
        self._attempt = 0
