"""What the model will see: a few rendered examples with the trained tokens marked, and dataset statistics."""

from __future__ import annotations

import math
import random
from itertools import islice

import datasets
from transformers import PreTrainedTokenizerBase

from smolfactory.data.packing import LengthGroupedBatchSampler, PackedDataset
from smolfactory.data.sft import SFTDataModule
from smolfactory.model.loss import IGNORE_INDEX

TRAINED_ON, TRAINED_OFF = "\033[42;30m", "\033[0m"  # green background, as on a terminal
STREAM_SAMPLE = 1000


def preview(datamodule: SFTDataModule, num_examples: int = 3, color: bool = False) -> str:
    """Examples of the training data with trained tokens marked, then statistics of the prepared data."""
    datamodule.setup("fit")
    data, tokenizer = datamodule.train_data, datamodule.tokenizer
    if isinstance(data, datasets.IterableDataset):  # a stream: look at its first examples
        data = datasets.Dataset.from_list(list(islice(data, STREAM_SAMPLE)))
    marks = (TRAINED_ON, TRAINED_OFF) if color else ("[[", "]]")
    parts = [f"Trained tokens are marked {marks[0]}like this{marks[1]}.\n"]
    for index in range(min(num_examples, len(data))):
        example = data[index]
        if "chosen_input_ids" in example:  # a preference pair: both sequences
            parts.append(f"--- pair {index + 1} of {len(data)} ---")
            for side in ("chosen", "rejected"):
                marked = mark_trained(tokenizer, example[f"{side}_input_ids"], example[f"{side}_labels"], marks)
                parts.append(f"[{side}, {len(example[f'{side}_input_ids'])} tokens]\n{marked}")
            continue
        parts.append(f"--- example {index + 1} of {len(data)} ({len(example['input_ids'])} tokens) ---")
        parts.append(mark_trained(tokenizer, example["input_ids"], example["labels"], marks))
    parts.append("--- statistics ---")
    if datamodule.hparams.streaming:
        parts.append(f"(streaming: statistics of the first {len(data)} examples)")
    parts += statistics_lines(datamodule, data)
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


def statistics_lines(datamodule: SFTDataModule, data: datasets.Dataset) -> list[str]:
    """Rows, token-length percentiles, share of tokens trained, and packing or padding efficiency of ``data``."""
    hparams = datamodule.hparams
    lines = []
    for name, summary in datamodule.summaries.items():
        lines.append(
            f"{name}: {summary['rows']} rows -> {summary['examples']} examples, {summary['truncated']} truncated, "
            f"{summary['dropped']} dropped, {summary['skipped']} bad rows skipped"
        )
    lengths = sorted(data["length"])
    if isinstance(datamodule.val_data, datasets.Dataset):
        lines.append(f"training examples: {len(data)}, validation examples: {len(datamodule.val_data)}")
    percentiles = ", ".join(f"p{p} {lengths[math.ceil(p / 100 * len(lengths)) - 1]}" for p in (50, 90, 99))
    if "chosen_labels" in data.column_names:  # pairs are never packed
        lines.append(f"tokens per pair (its longer sequence): {percentiles}, max {lengths[-1]}")
        return lines
    lines.append(f"tokens per example: {percentiles}, max {lengths[-1]}, total {sum(lengths)}")
    trained = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in data["labels"])
    lines.append(f"tokens trained: {trained} of {sum(lengths)} ({trained / sum(lengths):.1%})")
    rows = len(PackedDataset(data, hparams.max_length))
    packed = sum(lengths) / (rows * hparams.max_length)
    lines.append(f"packing (data.packing: true): {rows} rows of {hparams.max_length} tokens, {packed:.1%} filled")
    padding = _padding_efficiency(data["length"], hparams.batch_size, hparams.seed)
    lines.append(f"padding (data.packing: false), batches of {hparams.batch_size}: {padding}")
    return lines


def _padding_efficiency(lengths: list[int], batch_size: int, seed: int) -> str:
    """Share of real tokens in padded batches, for a shuffled epoch and for group_by_length."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    grouped = LengthGroupedBatchSampler(order, batch_size, False, lengths)
    shuffled = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def filled(batches: list[list[int]]) -> float:
        return sum(lengths) / sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)

    return f"{filled(shuffled):.1%} real tokens shuffled, {filled(list(grouped)):.1%} with data.group_by_length: true"
