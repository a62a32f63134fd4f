"""Training loaders that resume exactly: after a resume, the batches are those the run would have had anyway.

torchdata's ``StatefulDataLoader`` keeps the position of an iteration (its sampler's, or its dataset's own state),
and Lightning (2.6) saves a train loader's ``state_dict`` in every checkpoint and hands it to ``load_state_dict``
before the resumed run's first ``iter``. Two things would still make a resumed run differ:

- Lightning fetches one batch ahead when a loader has no length (a stream): at a checkpoint the loader has
  handed out one more batch than the loop trained on. ``ResumableLoader`` keeps the state after each batch it
  hands out, and the data module says when the training loop takes one (``batch_taken``, from its public
  ``on_before_batch_transfer`` hook): a checkpoint keeps the state after the last batch taken.
- Lightning numbers epochs its own way: a run that ended at ``max_steps`` and is resumed with a larger one starts
  Lightning's next epoch. So the loader counts its own passes (``epoch``), which seed the order of the data, and a
  resumed pass goes on where it stopped; when it runs out, the next pass starts, as in a run never interrupted.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any, Protocol

import datasets
from torch.utils.data import BatchSampler, IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from smolfactory.data.packing import pack_examples


class Ordered(Protocol):
    """A sampler or stream whose order depends on the pass over the data."""

    epoch: int


class ResumableLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose state is that of the batches the training loop took, with its own pass count.

    The state: ``{epoch, batches, finished, loader}``, the pass, the batches of it taken, whether they were all of
    it, and torchdata's state of the pass (``{}`` at its end); ``{}`` before the first batch.
    """

    def __init__(self, *args: Any, order: Ordered, **kwargs: Any) -> None:
        """DataLoader's arguments, and ``order``: the sampler or stream that the loader tells each pass's number."""
        super().__init__(*args, **kwargs)
        self.order = order
        self.epoch = -1  # no pass yet
        self.batches = 0
        self.pending: deque[dict[str, Any]] = deque()  # the state after each batch handed out and not yet taken
        self.taken: dict[str, Any] = {}
        self.resume_from: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.taken

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_from = state_dict or None

    def batch_taken(self) -> None:
        """The training loop took the oldest batch handed out: a checkpoint now resumes after it."""
        if self.pending:
            self.taken = self.pending.popleft()

    def __iter__(self) -> Iterator[Any]:
        state, self.resume_from = self.resume_from, None
        if state is not None and not state["finished"]:  # go on with the interrupted pass
            self.epoch, self.batches = state["epoch"], state["batches"]
            super().load_state_dict(state["loader"])
        else:
            self.epoch, self.batches = (state["epoch"] if state else self.epoch) + 1, 0
        if state is not None:
            self.taken = state
        self.order.epoch = self.epoch
        self.pending.clear()
        return self._handed_out(super().__iter__())

    def _handed_out(self, batches: Iterator[Any]) -> Iterator[Any]:
        length = None if isinstance(self.dataset, IterableDataset) else len(self)
        for batch in batches:
            self.batches += 1
            self.pending.append(self._state(finished=self.batches == length))
            yield batch
        # The pass ran out (a stream has no length): the last batch handed out was its last.
        if self.pending:
            self.pending[-1] = self._state(finished=True)
        else:
            self.taken = self._state(finished=True)

    def _state(self, finished: bool) -> dict[str, Any]:
        loader = {} if finished else super().state_dict()
        return {"epoch": self.epoch, "batches": self.batches, "finished": finished, "loader": loader}


class WindowedStream(IterableDataset):
    """Loader items from a stream of examples, read in windows: shuffled per window, packed, and resumable.

    Each window of ``window`` examples is shuffled with a seed of its own (``seed``, ``epoch``, window number;
    ``seed=None`` keeps the order), then, with ``capacity``, packed into rows of at most ``capacity`` tokens (best
    fit decreasing over each ``pack_size`` examples). The state is the source's state where the window starts
    (datasets' ``state_dict``, exact for a tokenized and filtered stream) and the items of the window handed out:
    a resume reads that one window again. (datasets' own shuffle buffer loses its contents on a resume.)
    """

    def __init__(
        self,
        examples: datasets.IterableDataset,
        seed: int | None,
        capacity: int | None = None,
        window: int = 10_000,
        pack_size: int = 1000,
    ) -> None:
        self.examples, self.seed, self.capacity = examples, seed, capacity
        self.window, self.pack_size = window, pack_size
        self.epoch = 0
        self.start = examples.state_dict()  # the stream's beginning
        self.position: dict[str, Any] = {"window": 0, "source": self.start, "items": 0}
        self.resume_from: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_from = state_dict

    def __iter__(self) -> Iterator[Any]:
        state, self.resume_from = self.resume_from, None
        self.position = state or {"window": 0, "source": self.start, "items": 0}
        self.examples.load_state_dict(self.position["source"])
        examples = iter(self.examples)
        number, source, skip = self.position["window"], self.position["source"], self.position["items"]
        while items := self._items(list(islice(examples, self.window)), number):
            self.position = {"window": number, "source": source, "items": skip}
            source = self.examples.state_dict()  # where the next window starts
            for item in items[skip:]:
                self.position["items"] += 1
                yield item
            number, skip = number + 1, 0

    def _items(self, window: list[dict[str, Any]], number: int) -> list[Any]:
        if self.seed is not None:
            random.Random(f"{self.seed}-{self.epoch}-{number}").shuffle(window)
        if self.capacity is None:
            return window
        rows = []
        for start in range(0, len(window), self.pack_size):
            chunk = window[start : start + self.pack_size]
            rows += [[chunk[i] for i in row] for row in pack_examples([e["length"] for e in chunk], self.capacity)]
        return rows


class RepeatedBatches(BatchSampler):
    """Batches of ``batch_size`` indices in ``sampler``'s order, each run of ``group`` batches given ``times`` in a row.

    Online RL (GRPO's ``num_iterations``) reuses one optimizer step's rollouts for ``times`` steps, so the same
    prompts must come again: with ``group=2, times=2``, batches ``b1 b2 b3 b4`` come as ``b1 b2 b1 b2 b3 b4 b3 b4``.
    With ``times > 1`` a pass's last run of fewer than ``group`` batches is left out (``left_out`` indices): it would
    be a step of other micro-batches than every other. The order depends only on the sampler's, so a resumed loader
    that skips the batches it handed out (torchdata's fast-forward) goes on exactly where it stopped, even inside a
    repeat. ``group=1, times=1`` are the plain batches.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, group: int = 1, times: int = 1) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.group, self.times = group, times

    def __iter__(self) -> Iterator[list[int]]:
        batches = super().__iter__()
        while run := list(islice(batches, self.group)):
            if len(run) < self.group and self.times > 1:
                return
            for _ in range(self.times):
                yield from run

    def __len__(self) -> int:
        batches = super().__len__()
        return batches if self.times == 1 else batches // self.group * self.group * self.times

    @property
    def left_out(self) -> int:
        """How many of a pass's indices no batch holds (the last run of fewer than ``group`` batches)."""
        whole = super().__len__() // self.group * self.group if self.times > 1 else super().__len__()
        return max(0, len(self.sampler) - whole * self.batch_size)
