"""Held-out splits of a dataset's samples: train / val / test by a seeded hash of each sample's
position in its dataset, so a sample keeps its split when more samples are scored.

    parts = split(sample_idx, val_fraction=0.1, test_fraction=0.2, seed=0)
    parts.test            # positions (into sample_idx) never used to fit anything

The gate's training records its split (``GateVersion.metrics_json["split"]``); evaluation holds
out exactly that test split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moe2.shared.errors import ConfigError

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Positions (into the samples given to ``split``) of the three parts."""

    train: IntArray
    val: IntArray
    test: IntArray
    seed: int

    def as_dict(self, sample_idx: IntArray) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "train": int(self.train.size),
            "val": int(self.val.size),
            "test": int(self.test.size),
            # dataset positions (Sample.idx): what evaluation holds out
            "val_idx": sample_idx[self.val].tolist(),
            "test_idx": sample_idx[self.test].tolist(),
        }


def split(
    sample_idx: IntArray | list[int], val_fraction: float, test_fraction: float, seed: int
) -> Split:
    """Test first, then val, then train, in the order of a seeded hash of each position."""
    idx = np.asarray(sample_idx, dtype=np.int64)
    n = idx.size
    keys = [hashlib.sha256(f"{seed}:{int(i)}".encode()).digest() for i in idx]
    order = np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)
    n_test = round(n * test_fraction)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ConfigError(
            f"{n} samples cannot be split into train, val ({val_fraction:g}) and test "
            f"({test_fraction:g}): score more samples or lower the fractions"
        )
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Split(np.sort(train), np.sort(val), np.sort(test), seed)
