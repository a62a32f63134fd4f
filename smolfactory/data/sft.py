"""SFTDataModule: chat datasets to padded batches of input ids and assistant-only labels."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import datasets
import lightning as L
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from smolfactory.data import formats, templates
from smolfactory.data.collate import pad_collate, prompt_collate
from smolfactory.data.formats import RowError, row_to_messages
from smolfactory.data.sources import load_rows
from smolfactory.data.templates import TemplateError, tokenize_conversation
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import BUILTIN_PREFIX, DEFAULT_MODEL, load_tokenizer
from smolfactory.model.loss import IGNORE_INDEX


class SFTDataModule(L.LightningDataModule):
    """Chat datasets to padded batches of input ids and assistant-only labels."""

    def __init__(
        self,
        tokenizer: str = DEFAULT_MODEL,
        dataset: str = "builtin:quickstart",
        validation_dataset: str | None = None,
        val_split: float = 0.05,
        messages_column: str = "messages",
        max_length: int = 2048,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        """Chat conversations, rendered with the tokenizer's chat template, loss on assistant turns only.

        Args:
            tokenizer: Model name whose tokenizer and chat template are used (the CLI links it to model.model_name).
            dataset: Hub dataset id, local json/jsonl/parquet/csv file, or builtin:quickstart.
            validation_dataset: Separate validation data (same forms as dataset); null splits it off dataset.
            val_split: Fraction of dataset held out for validation (unused with validation_dataset or builtin data).
            messages_column: Column holding each row's list of {role, content} messages.
            max_length: Longest example in tokens; longer ones are truncated (and dropped if nothing is left to train).
            batch_size: Examples per micro-batch, padded to the longest in the batch.
            num_workers: DataLoader worker processes.
            seed: Seed of the train/validation split.
        """
        super().__init__()
        if not 0 <= val_split < 1:
            raise SmolFactoryError(f"data.val_split must be in [0, 1), got {val_split}")
        if max_length < 2 or batch_size < 1:
            raise SmolFactoryError(
                f"data.max_length must be >= 2 and data.batch_size >= 1, got {max_length}, {batch_size}"
            )
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_data: datasets.Dataset | None = None
        self.val_data: datasets.Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        source, validation = self.hparams.dataset, self.hparams.validation_dataset
        train = self._tokenize(load_rows(source, "train"), source)
        if validation:
            self.train_data, self.val_data = train, self._tokenize(load_rows(validation, "validation"), validation)
        elif source.startswith(BUILTIN_PREFIX):  # built-in datasets ship their own held-out split
            self.train_data, self.val_data = train, self._tokenize(load_rows(source, "validation"), source)
        elif self.hparams.val_split == 0:
            self.train_data, self.val_data = train, None
        else:
            self.train_data, self.val_data = self._split(train, source)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False) if self.val_data is not None else []

    def test_dataloader(self) -> DataLoader:
        """The validation data: `smolfactory test` reports the held-out loss of a checkpoint."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts of the validation data (the training data without one), for `smolfactory predict`."""
        data = self.val_data if self.val_data is not None else self.train_data
        return self._loader(data, shuffle=False, collate=prompt_collate)

    def _loader(self, data: datasets.Dataset, shuffle: bool, collate: Callable = pad_collate) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def _split(self, data: datasets.Dataset, source: str) -> tuple[datasets.Dataset, datasets.Dataset]:
        val_split = self.hparams.val_split
        if len(data) - math.ceil(len(data) * val_split) < 1:
            raise SmolFactoryError(
                f"dataset {source} has {len(data)} usable rows, too few to hold out data.val_split={val_split}; "
                "set data.val_split: 0 or give data.validation_dataset"
            )
        split = data.train_test_split(test_size=val_split, seed=self.hparams.seed)
        return split["train"], split["test"]

    def _tokenize(self, rows: datasets.Dataset, source: str) -> datasets.Dataset:
        """Render, tokenize and mask every row (numbered as in the file), then drop rows with nothing to train."""
        column = self.hparams.messages_column
        if column not in rows.column_names:
            raise SmolFactoryError(
                f"dataset {source} has columns {rows.column_names} but no '{column}' column of "
                f"{{role, content}} messages; rename the column or set data.messages_column"
            )
        # datasets fingerprints the mapped function but not the code it calls: include our code and the
        # tokenizer explicitly, so a change to masking never reuses stale cached labels.
        fingerprint = Hasher.hash(
            (rows._fingerprint, _PIPELINE_SOURCE, Hasher.hash(self.tokenizer), column, self.hparams.max_length)
        )
        tokenized = rows.map(
            partial(
                _tokenize_row,
                tokenizer=self.tokenizer,
                column=column,
                max_length=self.hparams.max_length,
                source=source,
            ),
            with_indices=True,
            remove_columns=rows.column_names,
            new_fingerprint=fingerprint,
            desc=f"Tokenizing {source}",
        )
        trainable = tokenized.filter(lambda example: example["num_trained"] > 0, desc="Dropping empty rows")
        truncated = sum(tokenized["truncated"])
        dropped = len(tokenized) - len(trainable)
        rank_zero_info(
            f"{source}: {len(trainable)} examples ({truncated} truncated to {self.hparams.max_length} tokens, "
            f"{dropped} dropped with nothing left to train)"
        )
        if len(trainable) == 0:
            raise SmolFactoryError(f"dataset {source} has no example with a trained token; raise data.max_length")
        return trainable.select_columns(["input_ids", "labels"])


def _tokenize_row(
    row: dict[str, Any],
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    column: str,
    max_length: int,
    source: str,
) -> dict[str, Any]:
    try:
        messages = row_to_messages(row, column)
        full = tokenize_conversation(tokenizer, messages)
    except (RowError, TemplateError) as error:
        # Rows count from 1, as the lines of a .jsonl file do.
        raise SmolFactoryError(f"{source}, row {index + 1}: {error}; fix or remove the row") from error
    input_ids, labels = full["input_ids"][:max_length], full["labels"][:max_length]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated": len(full["input_ids"]) > max_length,
        "num_trained": sum(label != IGNORE_INDEX for label in labels[1:]),
    }


# The code that turns rows into examples; part of the cache fingerprint (see SFTDataModule._tokenize).
_PIPELINE_SOURCE = "".join(inspect.getsource(code) for code in (formats, templates, _tokenize_row))
