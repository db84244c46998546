"""Aggregate statistics that sites compute and a federation adds up.

Pure numpy, shared by the site side (which computes them on its own training patients) and the
server side (which merges them into shared preprocessing), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GenomicsStats", "STD_FLOOR"]

#: A feature whose standard deviation is below this is constant: it standardises to 0, not to noise.
STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class GenomicsStats:
    """Per-feature count, sum and sum of squares of the (log1p-transformed) values of TRAINING
    patients; missing values are not counted.

    These are aggregate numbers, additive across sites: ``merge`` of every site's stats equals
    the stats of the pooled training patients, which is how a federation gets a shared
    standardisation without moving patient rows. Standard deviation is the population one (as
    sklearn's StandardScaler).
    """

    features: tuple[str, ...]
    count: np.ndarray  # (F,) int64
    sum: np.ndarray  # (F,) float64
    sum_sq: np.ndarray  # (F,) float64

    def __post_init__(self) -> None:
        F = len(self.features)
        for name, dtype in (("count", np.int64), ("sum", np.float64), ("sum_sq", np.float64)):
            arr = np.array(getattr(self, name), dtype=dtype)  # a private, read-only copy
            if arr.shape != (F,):
                raise ValueError(f"GenomicsStats.{name}: shape {arr.shape}, expected ({F},) for {F} features")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "features", tuple(self.features))

    @classmethod
    def from_frame(cls, frame: Any) -> "GenomicsStats":
        """Statistics of a patients x features frame (anything with ``columns`` and ``to_numpy``,
        e.g. a pandas DataFrame); NaN/Inf cells are skipped per feature."""
        x = frame.to_numpy(dtype=np.float64)
        ok = np.isfinite(x)
        z = np.where(ok, x, 0.0)
        return cls(tuple(map(str, frame.columns)), ok.sum(0), z.sum(0), (z * z).sum(0))

    @classmethod
    def merge(cls, *stats: "GenomicsStats") -> "GenomicsStats":
        """Sum several sites' statistics (pure; all must describe the same ordered features)."""
        if not stats:
            raise ValueError("GenomicsStats.merge: nothing to merge")
        for s in stats[1:]:
            if s.features != stats[0].features:
                raise ValueError("GenomicsStats.merge: statistics describe different features or a "
                                 "different feature order")
        return cls(stats[0].features, sum(s.count for s in stats), sum(s.sum for s in stats),
                   sum(s.sum_sq for s in stats))

    def mean(self) -> np.ndarray:
        """Per-feature mean; 0 for a feature no training patient has (then imputation gives 0)."""
        n = self.count.astype(np.float64)
        return np.where(n > 0, self.sum / np.maximum(n, 1.0), 0.0)

    def _raw_std(self) -> np.ndarray:
        n = np.maximum(self.count.astype(np.float64), 1.0)
        return np.sqrt(np.maximum(self.sum_sq / n - self.mean() ** 2, 0.0))

    def degenerate(self, floor: float = STD_FLOOR) -> np.ndarray:
        """True for features that are constant or unobserved (their std is taken as 1)."""
        return (self.count == 0) | (self._raw_std() < floor)

    def std(self, floor: float = STD_FLOOR) -> np.ndarray:
        """Per-feature population std; 1 where it is below ``floor`` or unknown (constant feature)."""
        return np.where(self.degenerate(floor), 1.0, self._raw_std())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (aggregate numbers only)."""
        return {"features": list(self.features), "count": self.count.tolist(), "sum": self.sum.tolist(),
                "sum_sq": self.sum_sq.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenomicsStats":
        return cls(tuple(d["features"]), np.asarray(d["count"]), np.asarray(d["sum"]), np.asarray(d["sum_sq"]))
