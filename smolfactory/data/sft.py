"""SFTDataModule: datasets of any common layout to batches of input ids and labels.

Each row (messages, sharegpt, alpaca, prompt_completion or text) becomes a conversation rendered with the chat
template, with labels only where the model learns (``kinds.Conversation``); examples are padded, grouped by
length, or packed. Loading, mixing, splits, the tokenization cache, loaders and resume are
``TokenizedDataModule``'s.
"""

from __future__ import annotations

from typing import Any

from smolfactory.data.base import BadRowPolicy, Overlong, TokenizedDataModule
from smolfactory.data.formats import Format
from smolfactory.data.kinds import Conversation
from smolfactory.data.sources import Datasets, ValidationDataset
from smolfactory.data.templates import TrainOn
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import DEFAULT_MODEL


class SFTDataModule(TokenizedDataModule):
    """Chat, instruction or text datasets to batches of input ids and labels for supervised fine-tuning."""

    def __init__(
        self,
        tokenizer: str = DEFAULT_MODEL,
        dataset: Datasets = "builtin:quickstart",
        validation_dataset: ValidationDataset = None,
        val_split: float = 0.05,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        train_on: TrainOn = "assistant",
        max_length: int = 2048,
        overlong: Overlong = "truncate",
        packing: bool = False,
        group_by_length: bool = False,
        on_bad_row: BadRowPolicy = "error",
        streaming: bool = False,
        batch_size: int = 4,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
    ) -> None:
        """Examples rendered with a chat template (or as plain text), with labels only where the model learns.

        Args:
            tokenizer: Model name whose tokenizer and chat template are used (the CLI links it to model.model_name).
            dataset: Training data: a Hub id, local json/jsonl/parquet/csv file or builtin:quickstart, or a list of
                {path, name, split, revision, format, columns, weight, num_samples} sources to mix.
            validation_dataset: Separate validation data (same forms as dataset); null splits it off dataset.
            val_split: Fraction of dataset held out for validation (unused with validation_dataset or builtin data).
            format: Row layout: messages, sharegpt, alpaca, prompt_completion, text, or auto (from the columns).
            columns: Column renames, layout field -> your column, e.g. {instruction: question, output: answer}.
            system_prompt: System turn added to conversations that have none.
            chat_template: Replaces the tokenizer's template: a built-in name (chatml), a .jinja file or a Jinja string.
            chat_template_kwargs: Extra variables for the chat template, e.g. {enable_thinking: false} for SmolLM3.
            train_on: Tokens with a loss: assistant (every assistant turn), last_assistant, or all.
            max_length: Longest example in tokens (and the length of a packed row).
            overlong: Longer examples keep their first max_length tokens (truncate), lose their prompt's start
                first so the answer fits (truncate_prompt), are dropped, or split into max_length pieces. An example
                left with no trained token is dropped and counted.
            packing: Pack examples into padding-free rows of max_length tokens (best-fit decreasing).
            group_by_length: Without packing, batch examples of similar length to cut padding.
            on_bad_row: A malformed row (not a length problem) stops with an error naming it, or is skipped and
                counted.
            streaming: Read and tokenize rows lazily while training, for data larger than memory. Needs
                trainer.max_steps; validation comes only from validation_dataset; weights become sampling odds.
            batch_size: Examples per micro-batch (packed rows per micro-batch with packing).
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the dataset (datasets.map); null tokenizes in this process.
            seed: Seed of the train/validation split and of dataset mixing.
        """
        super().__init__(Conversation(train_on, packing, max_length), streaming)
        if packing and group_by_length:
            raise SmolFactoryError("set data.packing or data.group_by_length, not both: packed rows have no padding")
