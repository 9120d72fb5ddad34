"""The seam every subset solver plugs into: one abstract method and what it returns."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moe2.controller.optimize.objective import Evaluator


@dataclass
class Found:
    indices: tuple[int, ...]  # the chosen experts; feasible and non-empty
    # Proven bound on J(found) − optimum: 0.0 when proven optimal, None when nothing is proven
    # (heuristics, a search cut short without a bound).
    gap: float | None
    stats: dict[str, Any] = field(default_factory=dict)


class Deadline:
    """A wall-clock limit in seconds; None means no limit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self._end = None if seconds is None else self.start + seconds

    def expired(self) -> bool:
        return self._end is not None and time.perf_counter() >= self._end

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Solver(ABC):
    name: ClassVar[str]

    @abstractmethod
    def search(self, ev: Evaluator, epsilon: float, deadline: Deadline) -> Found:
        """The best subset this solver finds, with J(S) ≤ optimum + ``epsilon`` if it is exact.

        Only called when at least one expert alone is feasible.
        """
