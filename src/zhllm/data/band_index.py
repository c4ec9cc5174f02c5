"""(key, value) pairs of uint64 kept on disk in sorted runs and read back in key ranges of bounded size.

The external sort behind on-disk deduplication (dedup.DiskDeduplicator). Pairs are buffered in a fixed-size
array; a full buffer is sorted by key (stably, so pairs with equal keys stay in the order they were added)
and written as one run file. `ranges` then cuts the key space into consecutive ranges and, per range,
gathers that range's slice of every run and sorts it: the result is the range's pairs sorted by key, equal
keys in insertion order. That replaces a k-way heap merge (a Python loop per pair) by a few numpy sorts per
range, and memory stays at a few times one range's pairs whatever the total.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

_PAIR_BYTES = 16


class SortedRuns:
    """Append (key, value) pairs; read them back sorted by key, range by range."""

    def __init__(self, directory: Path, name: str, buffer_pairs: int):
        if buffer_pairs < 1:
            raise ValueError("buffer_pairs must be positive")
        self.directory, self.name = Path(directory), name
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keys = np.empty(buffer_pairs, np.uint64)
        self._values = np.empty(buffer_pairs, np.uint64)
        self._n = 0
        self.runs: list[tuple[Path, int]] = []   # (file, pairs): keys then values, each `pairs` uint64
        self.total = 0

    def add(self, keys: np.ndarray, value: int) -> None:
        """Pairs (k, value) for every k in `keys`."""
        n = len(keys)
        if n > len(self._keys):
            self.add_many(np.asarray(keys, np.uint64), np.full(n, value, np.uint64))
            return
        if self._n + n > len(self._keys):
            self.flush()
        self._keys[self._n:self._n + n] = keys
        self._values[self._n:self._n + n] = value
        self._n += n

    def add_many(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Pairs (keys[i], values[i]), written in buffer-sized pieces."""
        step = len(self._keys)
        for start in range(0, len(keys), step):
            k, v = keys[start:start + step], values[start:start + step]
            if self._n + len(k) > step:
                self.flush()
            self._keys[self._n:self._n + len(k)] = k
            self._values[self._n:self._n + len(k)] = v
            self._n += len(k)

    def flush(self) -> None:
        if self._n == 0:
            return
        keys, values = self._keys[:self._n], self._values[:self._n]
        order = np.argsort(keys, kind="stable")
        path = self.directory / f"{self.name}-{len(self.runs):05d}.bin"
        with open(path, "wb") as fh:
            keys[order].tofile(fh)
            values[order].tofile(fh)
        self.runs.append((path, self._n))
        self.total += self._n
        self._n = 0

    def adopt(self, path: Path, pairs: int, map_values: Callable[[np.ndarray], np.ndarray],
              chunk: int = 1 << 20) -> None:
        """Add a run file of another SortedRuns (`pairs` pairs) as a run of this one, each value replaced by
        `map_values(value)`. The keys are copied as they are, so the run stays sorted; copied in chunks."""
        self.flush()
        out = self.directory / f"{self.name}-{len(self.runs):05d}.bin"
        with open(path, "rb") as src, open(out, "wb") as dst:
            for transform in (None, map_values):
                for start in range(0, pairs, chunk):
                    part = np.fromfile(src, np.uint64, min(chunk, pairs - start))
                    (part if transform is None else transform(part)).astype(np.uint64, copy=False).tofile(dst)
        self.runs.append((out, pairs))
        self.total += pairs

    def close(self) -> None:
        """Write the last run and free the buffer (reading needs only the runs)."""
        self.flush()
        self._keys = self._values = np.empty(0, np.uint64)

    def ranges(self, n_ranges: int, key_limit: int = 1 << 64) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(start, stop, keys, values) for `n_ranges` equal consecutive key ranges [start, stop) covering
        [0, key_limit): the pairs of each, sorted by key, equal keys in insertion order. Memory is about the
        largest range's pairs: choose `n_ranges` as total / budget for uniform keys (hashes), or so that
        each range's key span times the most pairs one key can have fits the budget (document ids)."""
        self.close()
        n_ranges = max(1, n_ranges)
        maps = [np.memmap(path, np.uint64, "r", shape=(n,)) for path, n in self.runs]
        lo = [0] * len(maps)
        for i in range(n_ranges):
            start, stop = key_limit * i // n_ranges, key_limit * (i + 1) // n_ranges
            keys, values = [], []
            for r, ((path, n), sorted_keys) in enumerate(zip(self.runs, maps)):
                hi = n if i == n_ranges - 1 else int(np.searchsorted(sorted_keys, np.uint64(stop)))
                if hi > lo[r]:
                    keys.append(_read(path, lo[r], hi - lo[r]))
                    values.append(_read(path, n + lo[r], hi - lo[r]))
                lo[r] = hi
            if not keys:
                yield start, stop, np.empty(0, np.uint64), np.empty(0, np.uint64)
                continue
            k, v = np.concatenate(keys), np.concatenate(values)
            del keys, values
            # Runs are concatenated in the order they were written and each is sorted stably, so a stable
            # sort keeps equal keys in insertion order.
            order = np.argsort(k, kind="stable")
            yield start, stop, k[order], v[order]
            del k, v, order


def _read(path: Path, offset: int, count: int) -> np.ndarray:
    # A plain read, not a slice of the memmap: mapped pages would count in the process's resident memory.
    with open(path, "rb") as fh:
        fh.seek(offset * 8)
        return np.fromfile(fh, np.uint64, count)


def shared_key_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For keys sorted ascending: (mask of the entries whose key occurs more than once, and for those entries
    the index of their key among such repeated keys, 0, 1, 2, ... in key order)."""
    if len(keys) == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    starts = np.empty(len(keys), bool)
    starts[0] = True
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    group = np.cumsum(starts) - 1
    sizes = np.diff(np.append(np.flatnonzero(starts), len(keys)))
    repeated = sizes > 1
    mask = repeated[group]
    index_of_group = np.cumsum(repeated) - 1
    return mask, index_of_group[group[mask]]
