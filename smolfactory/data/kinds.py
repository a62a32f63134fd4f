"""Kinds of example: what a row becomes, how examples are batched, and how ``preview`` shows one.

A data module (``base.TokenizedDataModule``) owns what every kind shares: sources, mixing, splits, the
tokenization cache, loaders and resume. It asks its kind, a small object, for the rest:

- ``columns``: the columns of a tokenized example (always with ``length``, which batching by length reads);
- ``layout``: a dataset's row layout, given or told from its columns, checked against the column renames;
- ``row_examples``: one row to its examples (``tokenize.tokenize_rows`` runs it in ``datasets.map``);
- ``train_collate`` and ``predict_collate``: a batch for the training step, and prompts with their reference
  answers for ``smolfactory predict``;
- ``show`` and ``statistics``: what ``preview`` prints;
- ``code``: the source of everything behind ``row_examples``, part of the tokenization cache's fingerprint.

A next kind is one more class here; the data module does not change. ``Prompt`` (GRPO's prompt with the columns its
rewards read) was one.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from smolfactory.data import formats, preference_formats, prompt_formats, templates, tokenize
from smolfactory.data.collate import (
    packed_collate,
    pad_collate,
    pair_collate,
    prompt_collate,
    reference_prompt_collate,
    rollout_prompt_collate,
)
from smolfactory.data.formats import check_columns, detect_format, row_to_example
from smolfactory.data.packing import PackedDataset
from smolfactory.data.preference_formats import row_to_pair
from smolfactory.data.preview import length_percentiles, mark_trained, padding_efficiency
from smolfactory.data.prompt_formats import row_to_prompt
from smolfactory.data.templates import TrainOn, render, tokenize_example, tokenize_turns
from smolfactory.data.tokenize import RowSettings, fit_length, leading_cut, trained_count
from smolfactory.model.loss import IGNORE_INDEX

Collate = Callable[[list[Any]], dict[str, Any]]
Marks = tuple[str, str]


class ExampleKind(ABC):
    """What a data module needs to know about one kind of example (see the module's docstring)."""

    columns: list[str]
    """The columns of a tokenized example; ``length`` among them."""
    packing: bool = False
    """Whether examples are packed into rows of ``max_length`` tokens (one loader item is then a row of examples)."""

    @abstractmethod
    def layout(self, layout: str, column_names: list[str], columns: dict[str, str]) -> str:
        """The row layout (``layout``, or the one ``auto`` finds in ``column_names``), checked against ``columns``;
        a ``formats.RowError`` says what is wrong."""

    @abstractmethod
    def templated_rows(self, layout: str) -> str | None:
        """How the error for a tokenizer without a chat template names rows of ``layout`` (``alpaca``), or None
        when such rows need no template."""

    @abstractmethod
    def row_examples(
        self, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, settings: RowSettings
    ) -> tuple[list[dict[str, Any]], bool]:
        """One row's examples (each with ``columns`` and ``num_trained``), and whether it was cut to fit."""

    def placeholder(self) -> dict[str, Any]:
        """The values a row that leaves no example (skipped or dropped) holds in each column, ``num_trained`` 0:
        of the column's type, since Arrow takes one type per column."""
        return {key: 0 if key == "length" else [] for key in self.columns} | {"num_trained": 0}

    @abstractmethod
    def train_collate(self, pad_token_id: int) -> Collate:
        """Loader items to a training batch."""

    @abstractmethod
    def predict_collate(self, pad_token_id: int) -> Collate:
        """Examples to left-padded prompts with their ``references`` (the answers the data gives)."""

    @abstractmethod
    def show(self, tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], number: str, marks: Marks) -> list[str]:
        """Lines that show one example (``number`` is ``3 of 120``) with its trained tokens between ``marks``."""

    @abstractmethod
    def statistics(self, data: datasets.Dataset, batch_size: int, seed: int) -> list[str]:
        """Lines of statistics of tokenized ``data``: lengths, and what batching them costs."""

    @property
    @abstractmethod
    def code(self) -> str:
        """The source of the code that turns rows into these examples."""


def source_of(*code: Any) -> str:
    """The source text of modules, classes and functions, joined."""
    return "".join(inspect.getsource(item) for item in code)


# The code every kind's rows go through: reading rows, chat templates, fitting lengths, counting.
SHARED_CODE = (formats, templates, tokenize.tokenize_rows, fit_length, leading_cut, trained_count)


@dataclass(frozen=True)
class Conversation(ExampleKind):
    """A chat, instruction or text row as one sequence: ``input_ids`` and ``labels`` on the trained tokens."""

    train_on: TrainOn = "assistant"
    """Tokens with a loss: assistant (every assistant turn), last_assistant, or all."""
    packing: bool = False
    """Pack examples into padding-free rows of ``max_length`` tokens (best-fit decreasing)."""
    max_length: int = 2048
    """The length of a packed row."""

    columns = ["input_ids", "labels", "length"]

    def layout(self, layout: str, column_names: list[str], columns: dict[str, str]) -> str:
        layout = detect_format(column_names, columns) if layout == "auto" else layout
        check_columns(layout, columns)
        return layout

    def templated_rows(self, layout: str) -> str | None:
        return layout if layout in ("messages", "sharegpt", "alpaca") else None

    def row_examples(
        self, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, settings: RowSettings
    ) -> tuple[list[dict[str, Any]], bool]:
        example = row_to_example(row, settings.format, settings.columns, settings.system_prompt)
        sequences = tokenize_example(tokenizer, example, self.train_on, settings.template_kwargs)
        pieces = [piece for sequence in sequences for piece in fit_length(sequence, settings)]
        examples = [
            {"input_ids": ids, "labels": labels, "length": len(ids), "num_trained": trained_count(labels)}
            for ids, labels in pieces
        ]
        return examples, max(len(sequence["input_ids"]) for sequence in sequences) > settings.max_length

    def train_collate(self, pad_token_id: int) -> Collate:
        """Packed rows side by side with restarting positions, or examples padded to the longest."""
        return partial(packed_collate if self.packing else pad_collate, pad_token_id=pad_token_id)

    def predict_collate(self, pad_token_id: int) -> Collate:
        return partial(prompt_collate, pad_token_id=pad_token_id)

    def show(self, tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], number: str, marks: Marks) -> list[str]:
        header = f"--- example {number} ({len(example['input_ids'])} tokens) ---"
        return [header, mark_trained(tokenizer, example["input_ids"], example["labels"], marks)]

    def statistics(self, data: datasets.Dataset, batch_size: int, seed: int) -> list[str]:
        lengths = data["length"]
        total, max_length = sum(lengths), self.max_length
        trained = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in data["labels"])
        rows = len(PackedDataset(data, max_length))
        filled = total / (rows * max_length)
        return [
            f"tokens per example: {length_percentiles(lengths)}, max {max(lengths)}, total {total}",
            f"tokens trained: {trained} of {total} ({trained / total:.1%})",
            f"packing (data.packing: true): {rows} rows of {max_length} tokens, {filled:.1%} filled",
            f"padding (data.packing: false), batches of {batch_size}: {padding_efficiency(lengths, batch_size, seed)}",
        ]

    @property
    def code(self) -> str:
        return source_of(*SHARED_CODE, Conversation)


@dataclass(frozen=True)
class PreferencePair(ExampleKind):
    """A prompt with a chosen and a rejected answer, as two sequences that share the prompt's tokens.

    Both are rendered with the chat template and tokenized as a conversation (the prompt ends where the generation
    prompt ends); only the answers' assistant turns have labels.
    """

    columns = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "length"]

    def layout(self, layout: str, column_names: list[str], columns: dict[str, str]) -> str:
        if layout == "auto":
            layout = detect_format(column_names, columns, preference_formats.REQUIRED_COLUMNS)
        if layout not in preference_formats.LAYOUT_FIELDS:
            raise formats.RowError(
                f"{layout} is not a preference layout ({', '.join(preference_formats.LAYOUT_FIELDS)})"
            )
        check_columns(layout, columns, preference_formats.LAYOUT_FIELDS)
        return layout

    def templated_rows(self, layout: str) -> str | None:
        return "preference"

    def row_examples(
        self, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, settings: RowSettings
    ) -> tuple[list[dict[str, Any]], bool]:
        """One pair (none when a side is left with nothing to train), and whether a side was cut to fit."""
        pair = row_to_pair(row, settings.format, settings.columns, settings.system_prompt)
        sequences = {}
        for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            messages = pair.prompt + answer
            turns = [i for i in range(len(pair.prompt), len(messages)) if messages[i]["role"] == "assistant"]
            sequences[side] = tokenize_turns(tokenizer, messages, turns, settings.template_kwargs)
        truncated = any(len(sequence["input_ids"]) > settings.max_length for sequence in sequences.values())
        if settings.overlong == "truncate_prompt":  # the same prompt tokens off both sides: as many as the longer needs
            cut = max(leading_cut(sequence["labels"], settings.max_length) for sequence in sequences.values())
            sequences = {side: {key: ids[cut:] for key, ids in seq.items()} for side, seq in sequences.items()}
        example: dict[str, Any] = {}
        for side, sequence in sequences.items():
            pieces = fit_length(sequence, settings)
            if not pieces:
                return [], truncated
            example[f"{side}_input_ids"], example[f"{side}_labels"] = pieces[0]
        example["length"] = max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))
        example["num_trained"] = min(trained_count(example["chosen_labels"]), trained_count(example["rejected_labels"]))
        return [example], truncated

    def train_collate(self, pad_token_id: int) -> Collate:
        return partial(pair_collate, pad_token_id=pad_token_id)

    def predict_collate(self, pad_token_id: int) -> Collate:
        return partial(chosen_prompt_collate, pad_token_id=pad_token_id)

    def show(self, tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], number: str, marks: Marks) -> list[str]:
        lines = [f"--- pair {number} ---"]
        for side in ("chosen", "rejected"):
            ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
            lines.append(f"[{side}, {len(ids)} tokens]\n{mark_trained(tokenizer, ids, labels, marks)}")
        return lines

    def statistics(self, data: datasets.Dataset, batch_size: int, seed: int) -> list[str]:
        lengths = data["length"]
        return [f"tokens per pair (its longer sequence): {length_percentiles(lengths)}, max {max(lengths)}"]

    @property
    def code(self) -> str:
        return source_of(*SHARED_CODE, preference_formats, PreferencePair)


def chosen_prompt_collate(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Left-padded prompts of a batch of pairs, with the chosen answers as references."""
    chosen = [{"input_ids": pair["chosen_input_ids"], "labels": pair["chosen_labels"]} for pair in pairs]
    return prompt_collate(chosen, pad_token_id)


# Columns whose text is the reference answer `smolfactory predict` writes beside a generation, first found first.
REFERENCE_COLUMNS = ("answer", "output")


@dataclass(frozen=True)
class Prompt(ExampleKind):
    """A prompt to answer (online RL: GRPO), with every other column of its row for the reward functions.

    The prompt is rendered with the chat template up to its generation prompt and tokenized (``prompt_ids``); an
    over-long one keeps its last ``max_length`` tokens (``truncate_prompt``: generation continues from the end, as
    TRL's ``max_prompt_length`` cuts on the left) or is dropped. The prompt as the rewards see it (``prompt``) and the
    row's other columns (``reward_columns``) are kept as JSON text: nested values survive, and datasets with other
    columns still concatenate. ``reference_ids`` are the tokens of an ``answer`` (else ``output``) text, for
    ``smolfactory predict``. Nothing is trained on a prompt's tokens; ``num_trained`` is their count, so every prompt
    is kept.
    """

    columns = ["prompt_ids", "reference_ids", "prompt", "reward_columns", "length"]

    def placeholder(self) -> dict[str, Any]:
        return super().placeholder() | {"prompt": "", "reward_columns": ""}

    def layout(self, layout: str, column_names: list[str], columns: dict[str, str]) -> str:
        if layout == "auto":
            layout = detect_format(column_names, columns, prompt_formats.REQUIRED_COLUMNS)
        if layout not in prompt_formats.LAYOUT_FIELDS:
            raise formats.RowError(f"{layout} is not a prompt layout ({', '.join(prompt_formats.LAYOUT_FIELDS)})")
        check_columns(layout, columns, prompt_formats.LAYOUT_FIELDS)
        return layout

    def templated_rows(self, layout: str) -> str | None:
        return "prompt"

    def row_examples(
        self, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, settings: RowSettings
    ) -> tuple[list[dict[str, Any]], bool]:
        """One prompt (none when it is too long and ``overlong`` is ``drop``), and whether it was too long."""
        prompt = row_to_prompt(row, settings.format, settings.columns, settings.system_prompt)
        text = render(tokenizer, prompt.messages, True, settings.template_kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes any BOS itself
        too_long = len(ids) > settings.max_length
        if too_long and settings.overlong == "drop":
            return [], True
        ids = ids[-settings.max_length :]
        reference = reference_text(prompt.columns)
        example = {
            "prompt_ids": ids,
            "reference_ids": tokenizer(reference, add_special_tokens=False)["input_ids"] if reference else [],
            "prompt": json.dumps(prompt.shown, ensure_ascii=False),
            "reward_columns": json_columns(prompt.columns),
            "length": len(ids),
            "num_trained": len(ids),
        }
        return [example], too_long

    def train_collate(self, pad_token_id: int) -> Collate:
        return partial(rollout_prompt_collate, pad_token_id=pad_token_id)

    def predict_collate(self, pad_token_id: int) -> Collate:
        return partial(reference_prompt_collate, pad_token_id=pad_token_id)

    def show(self, tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], number: str, marks: Marks) -> list[str]:
        """The rendered prompt (nothing in it is trained, so nothing is marked) and the columns its rewards get."""
        header = f"--- prompt {number} ({len(example['prompt_ids'])} tokens) ---"
        columns = json.loads(example["reward_columns"])
        lines = [f"  {name}: {json.dumps(value, ensure_ascii=False)}" for name, value in columns.items()]
        return [header, tokenizer.decode(example["prompt_ids"]), "[columns for the rewards]", *lines]

    def statistics(self, data: datasets.Dataset, batch_size: int, seed: int) -> list[str]:
        lengths = data["length"]
        names = dict.fromkeys(name for text in data["reward_columns"] for name in json.loads(text))
        conversational = sum(text.startswith("[") for text in data["prompt"])
        return [
            f"tokens per prompt: {length_percentiles(lengths)}, max {max(lengths)}",
            f"prompts: {len(lengths)} ({conversational} conversational); columns for the rewards: "
            f"{', '.join(names) or 'none'}",
        ]

    @property
    def code(self) -> str:
        return source_of(*SHARED_CODE, prompt_formats, Prompt, reference_text, json_columns)


def reference_text(columns: dict[str, Any]) -> str:
    """The first text among a row's ``REFERENCE_COLUMNS`` (the answer the data gives), or ``""``."""
    return next((columns[name] for name in REFERENCE_COLUMNS if isinstance(columns.get(name), str)), "")


def json_columns(columns: dict[str, Any]) -> str:
    """A row's columns as JSON text, or a ``RowError`` naming a column whose value JSON cannot hold."""
    for name, value in columns.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise formats.RowError(
                f"column '{name}' holds a {type(value).__name__}, which cannot be kept for the reward functions "
                f"(JSON): {error}"
            ) from error
    return json.dumps(columns, ensure_ascii=False)
