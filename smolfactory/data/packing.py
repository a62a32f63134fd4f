"""Packing examples into rows without padding, and batching similar lengths together.

A packed row holds several whole examples back to back. ``packed_collate`` gives each example its own
``position_ids`` (restarting at 0) and no ``attention_mask``: transformers then finds the example
boundaries from the position ids and no example attends to another (eager, and sdpa on a GPU, build a
block-diagonal mask per row; flash-attention takes the rows flattened, see ``RecipeModule.final_hidden_states``;
sdpa on a CPU attends example by example, see ``smolfactory.model.packed_attention``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Dataset, Sampler


def pack_examples(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: group example indices into rows of at most ``capacity`` tokens.

    Longest examples first; each goes into the open row it fills most tightly, or opens a new row.
    ``pack_examples([5, 3, 4, 2], 8)`` gives ``[[0, 1], [2, 3]]``.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an example is longer than the row capacity {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted: the best fit is a bisection away
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[index], -1))
        if at == len(free):
            rows.append([index])
            bisect.insort(free, (capacity - lengths[index], len(rows) - 1))
            continue
        space, row = free.pop(at)
        rows[row].append(index)
        bisect.insort(free, (space - lengths[index], row))
    return rows


class PackedDataset(Dataset):
    """Rows of packed examples: item ``i`` is the list of examples of row ``i``."""

    def __init__(self, examples: Dataset, capacity: int) -> None:
        self.examples = examples
        self.rows = pack_examples(examples["length"], capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, list[int]]]:
        return [self.examples[i] for i in self.rows[index]]


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar lengths, so padding stays small, in an order that still follows ``sampler``.

    The sampler's order is cut into windows of ``batch_size * window_batches`` examples; each window is
    sorted by length and cut into batches. Lightning re-creates this class with a distributed sampler
    under DDP, keeping ``lengths``.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        window_batches: int = 64,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = lengths
        self.window_batches = window_batches

    def __iter__(self) -> Iterator[list[int]]:
        window: list[int] = []
        for index in self.sampler:
            window.append(index)
            if len(window) == self.batch_size * self.window_batches:
                yield from self._batches(window)
                window = []
        if window:
            yield from self._batches(window)

    def _batches(self, window: list[int]) -> Iterator[list[int]]:
        window = sorted(window, key=lambda i: -self.lengths[i])
        for start in range(0, len(window), self.batch_size):
            batch = window[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch that depends only on ``(seed, epoch)``, never on the global RNG.

    ``loaders.ResumableLoader`` sets ``epoch`` at each pass, so a resumed run draws the same order as the
    uninterrupted one. (No ``set_epoch``: Lightning would set its own epoch number, which a resumed run counts
    differently.)
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
