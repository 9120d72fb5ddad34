"""What a solver answers: a chosen subset with its figures, or why nothing is feasible.

``to_json`` gives exactly the output format of docs/method.md, "The problem file".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Solution:
    subset: tuple[str, ...]  # expert names, in the problem's order
    indices: tuple[int, ...]  # their positions in the problem's expert list
    objective: float  # J(S), nats per sample
    delay: dict[str, float]  # app -> expected delay, seconds (every app, limited or not)
    energy: float  # expected energy per sample, joules
    optimal: bool  # proven optimal; False when only ε-optimal, time-limited or heuristic
    stats: dict[str, Any] = field(default_factory=dict)
    feasible: Literal[True] = True

    def to_json(self) -> dict[str, Any]:
        return {
            "subset": list(self.subset),
            "objective": self.objective,
            "delay": dict(self.delay),
            "energy": self.energy,
            "feasible": True,
            "optimal": self.optimal,
            "stats": dict(self.stats),
        }


@dataclass(frozen=True)
class Infeasible:
    reason: str  # names the limit that cannot be met, with its best value and the limit
    stats: dict[str, Any] = field(default_factory=dict)
    feasible: Literal[False] = False

    def to_json(self) -> dict[str, Any]:
        return {"feasible": False, "reason": self.reason}
