"""What the model will see: a few rendered examples with the trained tokens marked, and dataset statistics."""

from __future__ import annotations

import math
import random
from itertools import islice
from typing import TYPE_CHECKING

import datasets
from transformers import PreTrainedTokenizerBase

from smolfactory.data.packing import LengthGroupedBatchSampler
from smolfactory.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from smolfactory.data.base import TokenizedDataModule

TRAINED_ON, TRAINED_OFF = "\033[42;30m", "\033[0m"  # green background, as on a terminal
STREAM_SAMPLE = 1000


def preview(datamodule: TokenizedDataModule, num_examples: int = 3, color: bool = False) -> str:
    """Examples of the training data with trained tokens marked, then statistics of the prepared data."""
    datamodule.setup("fit")
    data, tokenizer, kind = datamodule.train_data, datamodule.tokenizer, datamodule.kind
    if isinstance(data, datasets.IterableDataset):  # a stream: look at its first examples
        data = datasets.Dataset.from_list(list(islice(data, STREAM_SAMPLE)))
    marks = (TRAINED_ON, TRAINED_OFF) if color else ("[[", "]]")
    parts = [f"Trained tokens are marked {marks[0]}like this{marks[1]}.\n"]
    for index in range(min(num_examples, len(data))):
        parts += kind.show(tokenizer, data[index], f"{index + 1} of {len(data)}", marks)
    parts.append("--- statistics ---")
    if datamodule.streaming:
        parts.append(f"(streaming: statistics of the first {len(data)} examples)")
    for name, summary in datamodule.summaries.items():
        parts.append(
            f"{name}: {summary['rows']} rows -> {summary['examples']} examples, {summary['truncated']} truncated, "
            f"{summary['dropped']} dropped, {summary['skipped']} bad rows skipped"
        )
    if isinstance(datamodule.val_data, datasets.Dataset):
        parts.append(f"training examples: {len(data)}, validation examples: {len(datamodule.val_data)}")
    parts += kind.statistics(data, datamodule.hparams.batch_size, datamodule.hparams.seed)
    return "\n".join(parts)


def mark_trained(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int], marks: tuple[str, str]
) -> str:
    """Decoded text with every run of trained tokens between the two marks."""
    pieces, run, run_trained = [], [], False
    for position, token in enumerate(input_ids):
        # The first token predicts nothing before it, so it is never trained (as in the loss).
        trained = position > 0 and labels[position] != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_decoded(tokenizer, run, run_trained, marks))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_decoded(tokenizer, run, run_trained, marks))
    return "".join(pieces)


def _decoded(tokenizer: PreTrainedTokenizerBase, ids: list[int], trained: bool, marks: tuple[str, str]) -> str:
    text = tokenizer.decode(ids)
    return f"{marks[0]}{text}{marks[1]}" if trained else text


def length_percentiles(lengths: list[int]) -> str:
    """``p50 A, p90 B, p99 C`` of token lengths."""
    lengths = sorted(lengths)
    return ", ".join(f"p{p} {lengths[math.ceil(p / 100 * len(lengths)) - 1]}" for p in (50, 90, 99))


def padding_efficiency(lengths: list[int], batch_size: int, seed: int) -> str:
    """Share of real tokens in padded batches, for a shuffled epoch and for group_by_length."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    grouped = LengthGroupedBatchSampler(order, batch_size, False, lengths)
    shuffled = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def filled(batches: list[list[int]]) -> float:
        return sum(lengths) / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    return f"{filled(shuffled):.1%} real tokens shuffled, {filled(list(grouped)):.1%} with data.group_by_length: true"
