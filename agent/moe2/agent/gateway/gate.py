"""Gate values g(x) over experts, and the top-k selection within a subset (eqs. 2, 26-28).

A gate maps a prompt to strictly positive values, one per expert it knows. Until the
controller pushes a trained gate for an application, the gateway uses ``UniformGate``:
equal values for every expert, which is what the paper's fusion reduces to without a gate.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np


class Gate(abc.ABC):
    version: str

    @abc.abstractmethod
    def values(self, prompt: str, experts: Sequence[str]) -> np.ndarray:
        """(len(experts),) strictly positive gate values for ``experts``, in that order."""


class UniformGate(Gate):
    version = "uniform"

    def values(self, prompt: str, experts: Sequence[str]) -> np.ndarray:
        return np.ones(len(experts), dtype=np.float64)


def top_k(values: np.ndarray, subset: Sequence[str], k: int) -> list[tuple[str, float]]:
    """Γ(x, S, k): the k members of ``subset`` with the largest gate values, with weights
    renormalised over them; ties keep the subset's order."""
    if len(subset) == 0:
        return []
    order = sorted(range(len(subset)), key=lambda i: (-float(values[i]), i))[: max(1, k)]
    chosen = np.array([values[i] for i in order], dtype=np.float64)
    weights = chosen / chosen.sum()
    return [(subset[i], float(w)) for i, w in zip(order, weights)]


def renormalise(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()} if total > 0 else {}
