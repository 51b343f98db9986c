"""Per-channel latent statistics of a dataset split, mergeable shard by shard.

What the generator needs (MMAudio ``ExtractedVGG.compute_latent_stats``): the mean and standard
deviation, per latent channel, of the codec's posterior **means** (``latent_mean`` arrays, not
samples drawn from the posterior) over every frame of every training clip::

    latent_mean = mean over (clips, frames) of x[..., c]
    latent_std  = std  over (clips, frames) of x[..., c]     (Bessel-corrected, as torch.std)

The generator then trains on ``(x - latent_mean) / latent_std`` (``Generator.normalize``).

Each shard's marker records its :class:`LatentMoments` (frame count, float64 per-channel sum and sum
of squared deviations from the shard's own mean); the driver merges the markers of the done train
shards in shard-name order. So the numbers depend only on the shards' content, never on which run
wrote which shard (a killed and resumed job gives the same statistics, bit for bit). Storing
squared deviations instead of a raw sum of squares avoids the cancellation of ``E[x²] − E[x]²``
when a channel's mean is large next to its spread; shards merge with the exact pairwise formula of
Chan, Golub & LeVeque, "Algorithms for computing the sample variance" (1979), eq. 2.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatentMoments:
    """``count`` frames; ``total`` (D,) float64 sum; ``m2`` (D,) float64 sum of squared deviations."""

    count: int
    total: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> LatentMoments:
        return cls(0, np.zeros(dim, np.float64), np.zeros(dim, np.float64))

    @classmethod
    def of(cls, frames: np.ndarray) -> LatentMoments:
        """Moments of a (N, D) array (any float dtype; accumulated in float64)."""
        x = np.asarray(frames, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"latent frames must be (N, D), got shape {x.shape}")
        if len(x) == 0:
            return cls.empty(x.shape[1])
        total = x.sum(axis=0)
        return cls(len(x), total, ((x - total / len(x)) ** 2).sum(axis=0))

    def merge(self, other: LatentMoments) -> LatentMoments:
        """Moments of the union (Chan et al. 1979): m2 = m2_a + m2_b + δ² · n_a n_b / n, δ = mean_b − mean_a."""
        if self.total.shape != other.total.shape:
            raise ValueError(f"latent widths differ: {self.total.shape} vs {other.total.shape}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.total / other.count - self.total / self.count
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return LatentMoments(n, self.total + other.total, m2)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def std(self) -> np.ndarray:
        """Bessel-corrected (ddof 1), the default of ``torch.std`` that MMAudio uses."""
        return np.sqrt(self.m2 / (self.count - 1))

    def to_json(self) -> dict[str, Any]:
        # float64 -> Python float -> JSON repr round-trips exactly
        return {"count": self.count, "sum": self.total.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentMoments:
        total, m2 = np.asarray(data["sum"], np.float64), np.asarray(data["m2"], np.float64)
        if total.shape != m2.shape or total.ndim != 1:
            raise ValueError(f"bad latent moments: sum {total.shape}, m2 {m2.shape}")
        return cls(int(data["count"]), total, m2)


def split_statistics(moments: list[LatentMoments], clips: int, shards: int, split: str) -> dict[str, Any]:
    """``dataset.json``'s ``latent_stats`` from the moments of a split's shards, merged in the given order."""
    merged = moments[0]
    for m in moments[1:]:
        merged = merged.merge(m)
    if merged.count < 2:
        raise ValueError(f"{split}: {merged.count} latent frame(s); a standard deviation needs two")
    return {
        "split": split,
        "shards": shards,
        "clips": clips,
        "frames": merged.count,
        "mean": merged.mean.tolist(),
        "std": merged.std.tolist(),
        "definition": "per channel over all frames of the split's latent_mean arrays; std with ddof 1",
    }
