"""Gate values g(x) over experts, and the top-k selection within a subset (eqs. 2, 26-28).

A gate maps a prompt to strictly positive values, one per expert it knows. Until the
controller pushes a trained gate for an application, the gateway uses ``UniformGate``:
equal values for every expert, which is what the paper's fusion reduces to without a gate.

What a gate costs is measured where it runs: every prompt's gate time (``timed_values``),
fitted per gate as a curve in the prompt's length in the gate's tokens (``GateLatency``, seeded
at load by ``probe``) and announced with the gate's acknowledgement, so the controller promises
the gate's real delay, prompt by prompt.
"""

from __future__ import annotations

import abc
import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from moe2.shared.costmodel import CostCurve, fit_curve


class Gate(abc.ABC):
    version: str

    @abc.abstractmethod
    def values(self, prompt: str, experts: Sequence[str]) -> np.ndarray:
        """(len(experts),) strictly positive gate values for ``experts``, in that order."""

    def tokens(self, prompt: str) -> int:
        """The prompt's length in the gate's own tokens (what its delay grows with)."""
        return 0


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


# Sentences of typical prompt lengths (3 to 60 words) that time a gate before its first
# prompt: the figure the gateway announces until prompts replace it.
PROBE_TEXTS = (
    "the fox eats",
    "def compute ( x ) : return x",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "bake the cake for thirty minutes in a hot oven, then let it cool on a rack before you cut it",
    "Question: Which of the following best describes the role of mitochondria in a cell? "
    "They store genetic information, they produce most of the energy the cell uses, they "
    "build proteins, or they control what enters and leaves the cell.\nAnswer:",
)


def timed_values(gate: Gate, prompt: str, experts: Sequence[str]) -> tuple[np.ndarray, float]:
    """The gate's values and the seconds they took (the gate's delay, eq. 8's τ_gate)."""
    t0 = time.perf_counter()
    values = gate.values(prompt, experts)
    return values, time.perf_counter() - t0


def probe(
    gate: Gate, experts: Sequence[str], texts: Sequence[str] = PROBE_TEXTS, repeats: int = 3
) -> list[tuple[int, float]]:
    """(tokens, seconds) of the gate on each of ``texts``, ``repeats`` times each (after one
    unmeasured run)."""
    gate.values(texts[0], experts)
    return [
        (gate.tokens(t), timed_values(gate, t, experts)[1]) for _ in range(repeats) for t in texts
    ]


class GateLatency:
    """What a gate costs per prompt on this gateway, as a curve in the prompt's length in the
    gate's tokens: fitted on the probe's points and the last ``window`` prompts it gated."""

    def __init__(self, probed: Sequence[tuple[int, float]], window: int = 256) -> None:
        self._probed = list(probed)
        self._served: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._served.append((tokens, seconds))

    def figure(self) -> tuple[CostCurve, int]:
        """(seconds as a line in tokens, how many of its points are gated prompts)."""
        with self._lock:
            served = list(self._served)
        points = self._probed + served
        xs = [float(n) for n, _ in points]
        ys = [s for _, s in points]
        if len(set(xs)) >= 2:
            return fit_curve(xs, ys, unit="s", relative=True), len(served)
        mean = float(np.mean(ys))
        curve = CostCurve(
            unit="s",
            coef=[mean],
            residual_std=float(np.std(ys)),
            rel_residual_std=float(np.std(ys) / mean) if mean > 0 else 0.0,
            n_points=len(ys),
            min_tokens=int(min(xs)),
            max_tokens=int(max(xs)),
        )
        return curve, len(served)
