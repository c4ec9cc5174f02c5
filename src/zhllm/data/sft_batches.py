"""Batches of SFT examples for the training loop: packed rows with segment ids, or length-grouped padding.

Packing puts several conversations into one row of `seq_len` tokens (best-fit decreasing, deterministic)
and returns `segment_ids`, so the model attends only within each conversation and restarts positions per
conversation: a packed row gives exactly the per-token losses of the conversations run one by one. The first
token of every conversation is never a label (it is the template's `<|im_start|>`), so no loss crosses a
boundary either. Without packing, rows are single conversations padded to the longest in the batch, with
neighbouring rows of similar length (length-grouped) so little compute goes to padding.

The row order is a pure function of (seed, epoch, position) (ARCHITECTURE rule 6): `batch(start, count)`
returns global rows start..start+count-1, epoch after epoch, so a resumed run sees the same data.
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from ..errors import ZhllmError
from .chat import IGNORE

Example = tuple[list[int], list[int]]  # (input_ids, labels) from chat.encode_records
PAD_SEGMENT = -1


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to <= capacity: best-fit decreasing, ties by index.

    Longest first leaves the short conversations to fill the gaps, each into the fullest row it fits; the
    open rows sit in a list sorted by free space, so a million conversations pack in seconds. Ties break on
    indices, so the result is deterministic. Bins keep their examples in input order.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ZhllmError(f"{len(too_long)} SFT examples are longer than the packed row ({capacity} tokens); "
                         f"set data.max_len <= the sequence length")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), ascending
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return [sorted(b) for b in bins]


def examples_to_arrays(examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat int64 ids, flat uint8 loss mask, int64 lengths) of (input_ids, labels) examples.

    A mask is enough because chat.py labels a trained token with its own id (it never shifts or rewrites
    labels); this is checked here, since SFT shards store only the mask.
    """
    lengths = np.fromiter((len(ids) for ids, _ in examples), dtype=np.int64, count=len(examples))
    total = int(lengths.sum())
    ids = np.fromiter((t for x, _ in examples for t in x), dtype=np.int64, count=total)
    labels = np.fromiter((t for _, y in examples for t in y), dtype=np.int64, count=total)
    mask = labels != IGNORE
    if not np.array_equal(labels[mask], ids[mask]):
        raise ValueError("SFT labels must be the input ids where trained and -100 elsewhere")
    return ids, mask.astype(np.uint8), lengths


def choose_val_examples(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the n examples held out for validation: a seeded random subset of round(n*fraction).

    Shared by the in-memory path and SFT shards, so both hold out exactly the same conversations.
    """
    if not 0 <= val_fraction < 1:
        raise ZhllmError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction and (n_val == 0 or n_val == n):
        raise ZhllmError(f"{n} SFT examples cannot be split with val_fraction {val_fraction}")
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng([seed, 1]).permutation(n)[:n_val]] = True
    return is_val


class SFTDataset:
    """Rows of SFT examples, indexed by a global position (see module docstring).

    packing=True: `seq_len` is the packed row length and every batch is (count, seq_len) with `segment_ids`
    (PAD_SEGMENT on padding). packing=False: each row is one example, batches are padded to their longest row
    and carry `attention_mask`; `group_window` consecutive rows (after the epoch's shuffle) are sorted by length.
    """

    def __init__(self, examples: list[Example], seq_len: int, packing: bool = True, seed: int = 0,
                 pad_id: int = 0, group_window: int = 64):
        ids, mask, lengths = examples_to_arrays(examples)
        self._setup(ids, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), seq_len, packing,
                    seed, pad_id, group_window)

    @classmethod
    def from_arrays(cls, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, packing: bool = True,
                    seed: int = 0, pad_id: int = 0, group_window: int = 64) -> "SFTDataset":
        """The dataset over flat arrays (e.g. memmaps of SFT shards; nothing is copied): `ids` and the per-token
        loss `mask` (labels are ids where mask is set, -100 elsewhere) of all examples back to back, and the
        example boundaries `offsets` (n + 1 of them, starting at 0)."""
        self = cls.__new__(cls)
        self._setup(ids, mask, offsets, seq_len, packing, seed, pad_id, group_window)
        return self

    def _setup(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, seq_len: int, packing: bool,
               seed: int, pad_id: int, group_window: int) -> None:
        if len(offsets) < 2:
            raise ZhllmError("no SFT examples to train on (all records were skipped or the input is empty)")
        if offsets[0] != 0 or offsets[-1] != len(ids) or len(mask) != len(ids):
            raise ValueError(f"SFT arrays disagree: {len(ids)} ids, {len(mask)} mask entries, "
                             f"offsets {int(offsets[0])}..{int(offsets[-1])}")
        self.seq_len, self.packing = seq_len, packing
        self.seed, self.pad_id, self.group_window = seed, pad_id, group_window
        # One flat array per field: compact, and rows are filled by slicing instead of per-example tensors.
        self.offsets, self.flat_ids, self.flat_mask = offsets, ids, mask
        lengths = np.diff(offsets).tolist()
        if packing:
            self.rows = pack_best_fit(lengths, seq_len)
        else:
            if max(lengths) > seq_len:
                raise ZhllmError(f"an SFT example has {max(lengths)} tokens, more than seq_len {seq_len}")
            self.rows = [[i] for i in range(len(lengths))]
        self.row_lengths = np.array([sum(lengths[i] for i in r) for r in self.rows], dtype=np.int64)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in one epoch."""
        return int(self.row_lengths.sum())

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of one epoch: a seeded shuffle, then (without packing) sorted by length per window."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        if not self.packing and self.group_window > 1:
            for s in range(0, len(perm), self.group_window):
                w = perm[s:s + self.group_window]
                perm[s:s + self.group_window] = w[np.argsort(-self.row_lengths[w], kind="stable")]
        self._order_cache = (epoch, perm)
        return perm

    def row_indices(self, start: int, count: int) -> list[int]:
        n = len(self.rows)
        return [int(self.order(pos // n)[pos % n]) for pos in range(start, start + count)]

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        """Rows start..start+count-1 (global positions, wrapping into later epochs) as tensors."""
        rows = [self.rows[r] for r in self.row_indices(start, count)]
        return self.collate(rows)

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        off = self.offsets
        width = self.seq_len if self.packing else max(int(sum(off[i + 1] - off[i] for i in r)) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        extra = np.full((len(rows), width), PAD_SEGMENT if self.packing else 0, dtype=np.int64)
        for b, row in enumerate(rows):
            pos = 0
            for seg, i in enumerate(row):
                a, z = off[i], off[i + 1]
                n = z - a
                ids[b, pos:pos + n] = self.flat_ids[a:z]
                labels[b, pos:pos + n] = np.where(self.flat_mask[a:z], ids[b, pos:pos + n], IGNORE)
                labels[b, pos] = IGNORE  # nothing predicts a conversation's first token across a boundary
                extra[b, pos:pos + n] = seg if self.packing else 1
                pos += n
        key = "segment_ids" if self.packing else "attention_mask"
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), key: torch.from_numpy(extra)}


def build_sft_datasets(tokenizer, inputs, seq_len: int, fmt: str = "auto", max_len: int | None = None,
                       packing: bool = True, val_fraction: float = 0.0, seed: int = 0, overflow: str = "truncate",
                       strict: bool = False, progress: bool = True):
    """Files -> (train SFTDataset, val SFTDataset or None, SFTStats, ReadStats): what `zhllm sft` trains on.

    The validation conversations are a seeded random subset (val_fraction of the good ones), chosen before
    packing, so no conversation is ever split between the two sets.
    """
    from .chat import SFTStats, encode_records, tokenizers_single_threaded
    from ..corpus.readers import ReadStats, expand_inputs, iter_records

    if not 0 <= val_fraction < 1:  # before the slow encode
        raise ZhllmError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    max_len = min(max_len or seq_len, seq_len)
    stats, read_stats = SFTStats(), ReadStats()
    records = iter_records(expand_inputs(inputs), strict=strict, stats=read_stats)
    with tokenizers_single_threaded():
        examples = encode_records(tokenizer, records, fmt=fmt, max_len=max_len, overflow=overflow, strict=strict,
                                  stats=stats, progress=progress)
    is_val = choose_val_examples(len(examples), val_fraction, seed)
    n_val = int(is_val.sum())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = SFTDataset([e for e, v in zip(examples, is_val, strict=True) if not v], seq_len, packing, seed, pad_id)
    val = (SFTDataset([e for e, v in zip(examples, is_val, strict=True) if v], seq_len, packing, seed, pad_id)
           if n_val else None)
    return train, val, stats, read_stats
