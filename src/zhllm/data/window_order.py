"""Which window comes at a global index: pure functions of (seed, index), no I/O.

`EpochOrder` walks one source's windows epoch after epoch, each epoch in its own seeded permutation.
`MixSchedule` interleaves several sources in given proportions. Both answer any index directly, so a
trainer that resumes at position p (on any number of ranks) sees exactly the windows it would have seen.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ZhllmError

MIX_BLOCK = 4096  # indices per mixing block: weights are honoured exactly at this granularity


class EpochOrder:
    """k-th window (counting across epochs) -> window number in [0, num_windows)."""

    def __init__(self, num_windows: int, seed: tuple, shuffle: bool = True):
        self.num_windows, self.seed, self.shuffle = num_windows, tuple(seed), shuffle
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # ranks straddle at most one epoch boundary
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def window_at(self, k: int) -> int:
        epoch, j = divmod(k, self.num_windows)
        return int(self.permutation(epoch)[j]) if self.shuffle else j


class MixSchedule:
    """Global index -> (source, k-th window of that source), a pure function of (seed, index).

    Every block of MIX_BLOCK indices holds a fixed quota per source (weights apportioned by largest
    remainder) in a seeded shuffled order, so the k-th use of a source is known without counting from 0.
    """

    def __init__(self, weights: Sequence[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        ideal = w / w.sum() * MIX_BLOCK
        quotas = np.floor(ideal).astype(np.int64)
        rest = MIX_BLOCK - int(quotas.sum())
        quotas[np.argsort(-(ideal - quotas), kind="stable")[:rest]] += 1
        if np.any((w > 0) & (quotas == 0)):
            raise ZhllmError(f"a mixing weight is below 1/{MIX_BLOCK} of the total; raise it or drop the source")
        self.quotas, self.seed = quotas, seed
        self._block = (-1, None, None)

    def locate(self, i: int) -> tuple[int, int]:
        b, r = divmod(i, MIX_BLOCK)
        if self._block[0] != b:
            layout = np.random.default_rng([self.seed, 0x6D6978, b]).permutation(
                np.repeat(np.arange(len(self.quotas)), self.quotas))
            ordinal = np.empty(MIX_BLOCK, dtype=np.int64)
            for s in range(len(self.quotas)):
                where = np.flatnonzero(layout == s)
                ordinal[where] = np.arange(len(where))
            self._block = (b, layout, ordinal)
        _, layout, ordinal = self._block
        s = int(layout[r])
        return s, b * int(self.quotas[s]) + int(ordinal[r])
